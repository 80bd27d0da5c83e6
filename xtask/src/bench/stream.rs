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
    fmt::Write as _,
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicI32, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned,
};
use serde_json::{json, Value};

use super::{
    lab::{self, check_stop, pin_current_thread, Lab, LISTEN_IP, PEER_IP, STOP},
    loadgen::{self, FloodPlan, Generator as _, SendGroup},
    measure,
    runner::{self, Ctx, PathKind, StreamListen, LISTEN_PORT, PEER_PORT},
    sink::{FarEnds, FLOOD_CLASS},
    turn::{self, Response, Transport, FIRST_CHANNEL},
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

/// The run's TLS material: a self-signed certificate and its key as PEM files in a private
/// directory (removed on drop), and the client configuration that pins the certificate.
pub struct TlsMaterial {
    dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    client: Arc<ClientConfig>,
}

impl TlsMaterial {
    pub fn generate(out: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let certified =
            rcgen::generate_simple_self_signed(vec!["bench.lab".to_owned(), LISTEN_IP.to_string()])
                .context("generating the benchmark's TLS certificate")?;
        let dir = out.join(format!("stream-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let material = Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
            client: client_config(certified.cert.der().clone())?,
        };
        let write = |path: &Path, text: &str, mode: u32| {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .with_context(|| format!("writing {}", path.display()))
        };
        write(&material.cert, &certified.cert.pem(), 0o644)?;
        write(&material.key, &certified.key_pair.serialize_pem(), 0o600)?;
        Ok(material)
    }
}

impl Drop for TlsMaterial {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// rustls with ring, TLS 1.2 and 1.3, no session resumption (every handshake is a full one,
/// as for a new client), trusting exactly `cert`.
fn client_config(cert: CertificateDer<'static>) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("rustls protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCert { cert, provider }))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Accepts exactly the run's own certificate and does not check the handshake signature: the
/// server is the one this run started in a namespace of its own, and verifying an ECDSA
/// signature per handshake would cost the generator core more than the server's signing
/// costs it, so the generator, not the server, could set the handshake rate.
#[derive(Debug)]
struct PinnedCert {
    cert: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "not the benchmark's certificate".to_owned(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client connection: plain TCP or TLS over TCP.
enum Conn {
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Self::Tcp(s) => s,
            Self::Tls(s) => &s.sock,
        }
    }

    /// "TLSv1_3 TLS13_AES_256_GCM_SHA384" once the handshake is done.
    fn tls_description(&self) -> Option<String> {
        let Self::Tls(s) = self else { return None };
        Some(format!(
            "{:?} {:?}",
            s.conn.protocol_version()?,
            s.conn.negotiated_cipher_suite()?.suite()
        ))
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// The length of the complete frame at the start of `buf` on a stream (RFC 8656 §12.5: STUN
/// by its header length; ChannelData by its length, padded to a multiple of 4), None while
/// incomplete, Err for bytes that are neither.
fn frame_len(buf: &[u8]) -> anyhow::Result<Option<usize>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    let total = match buf[0] >> 6 {
        0b00 => 20 + len,
        0b01 => (4 + len).next_multiple_of(4),
        _ => bail!(
            "the server sent neither STUN nor ChannelData ({:#04x})",
            buf[0]
        ),
    };
    Ok((buf.len() >= total).then_some(total))
}

/// Requests over a connection, responses read back by the stream framing; what is not the
/// awaited response (ChannelData, other messages) is skipped. Bounded by the connection's
/// read timeout and `limit`.
struct StreamTransportConn {
    conn: Conn,
    buf: Vec<u8>,
    limit: Duration,
}

impl Transport for StreamTransportConn {
    fn exchange(
        &mut self,
        message: &[u8],
        method: u16,
        tid: &[u8; 12],
    ) -> anyhow::Result<Response> {
        self.conn.write_all(message)?;
        self.conn.flush()?;
        let deadline = Instant::now() + self.limit;
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(n) = frame_len(&self.buf)? {
                let frame: Vec<u8> = self.buf.drain(..n).collect();
                if let Some(response) = turn::decode(&frame, method, tid) {
                    return Ok(response);
                }
            }
            if Instant::now() > deadline || self.buf.len() > 1 << 16 {
                bail!(
                    "no response to method {method:#06x} within {:?}",
                    self.limit
                );
            }
            match self.conn.read(&mut chunk) {
                Ok(0) => bail!("the server closed the connection (method {method:#06x})"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!(
                        "no response to method {method:#06x} within {:?}",
                        self.limit
                    )
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A TCP connection from `src` (any port) to `dst`, connect bounded by `timeout`. The source
/// addresses spread the handshakes over the lab's client addresses, so TIME_WAIT and the
/// ephemeral ports of one address never limit them.
fn connect_from(src: Ipv4Addr, dst: SocketAddrV4, timeout: Duration) -> std::io::Result<TcpStream> {
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: socket() has no preconditions; the descriptor is checked, then owned by the
    // TcpStream below, which closes it on every path.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    let local = sockaddr(SocketAddrV4::new(src, 0));
    let remote = sockaddr(dst);
    // SAFETY: each call reads a value of the size passed from our stack, on our socket. The
    // port is chosen at connect (IP_BIND_ADDRESS_NO_PORT), per destination; SO_SNDTIMEO
    // bounds a blocking connect on Linux.
    let rc = unsafe {
        let set = |level, name, value: *const libc::c_void, size: usize| {
            libc::setsockopt(fd, level, name, value, size as libc::socklen_t)
        };
        if set(
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of_val(&one),
        ) != 0
            || set(
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                std::ptr::addr_of!(tv).cast(),
                std::mem::size_of_val(&tv),
            ) != 0
            || libc::bind(fd, std::ptr::addr_of!(local).cast(), len) != 0
        {
            -1
        } else {
            libc::connect(fd, std::ptr::addr_of!(remote).cast(), len)
        }
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects client `index` over `transport` and completes the TLS handshake (eagerly, so a
/// failure is named as one).
fn connect(
    transport: StreamTransport,
    tls: &TlsMaterial,
    index: usize,
    timeout: Duration,
) -> anyhow::Result<Conn> {
    let dst = SocketAddrV4::new(LISTEN_IP, transport.port());
    let tcp = connect_from(lab::client_ip(index), dst, timeout)
        .with_context(|| format!("{} connect to {dst}", transport.name()))?;
    Ok(match transport {
        StreamTransport::Tcp => Conn::Tcp(tcp),
        StreamTransport::Tls => {
            let name = ServerName::from(IpAddr::V4(LISTEN_IP));
            let mut conn = ClientConnection::new(Arc::clone(&tls.client), name)?;
            let mut tcp = tcp;
            while conn.is_handshaking() {
                conn.complete_io(&mut tcp).context("TLS handshake")?;
            }
            Conn::Tls(Box::new(StreamOwned::new(conn, tcp)))
        }
    })
}

/// A TURN session over a new connection: Allocate (with the 401 round) as client `index`.
fn session(
    transport: StreamTransport,
    tls: &TlsMaterial,
    ctx: &Ctx,
    index: usize,
    name: &str,
) -> anyhow::Result<(turn::Client<StreamTransportConn>, SocketAddr)> {
    let timeout = Duration::from_secs(3);
    let conn = connect(transport, tls, index, timeout)?;
    let (user, pass) = turn::rest_credentials(&ctx.secret, name);
    let mut client = turn::Client::over(
        StreamTransportConn {
            conn,
            buf: Vec::new(),
            limit: timeout,
        },
        index as u64,
        user,
        &pass,
    );
    let relayed = client.allocate()?;
    Ok((client, relayed))
}

/// Whether the server answers a Binding request over `transport` (its stream listener is up).
fn probe(transport: StreamTransport, tls: &TlsMaterial) -> anyhow::Result<()> {
    let conn = connect(transport, tls, 0, Duration::from_millis(500))?;
    let mut t = StreamTransportConn {
        conn,
        buf: Vec::new(),
        limit: Duration::from_millis(500),
    };
    let tid = [0x53u8; 12];
    match t.exchange(&turn::binding_request(&tid), turn::BINDING, &tid)? {
        Response::Success(_) => Ok(()),
        Response::Error(code, _) => bail!("Binding over {}: error {code}", transport.name()),
    }
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
    let generator: Option<u64> = generator_tids
        .iter()
        .map(|&t| thread_cpu_ns(t))
        .sum::<Option<u64>>();
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
        if spins.is_multiple_of(64) && (Instant::now() >= until || STOP.load(Ordering::Relaxed)) {
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
    let until = Instant::now() + run;
    std::thread::scope(|scope| {
        let generator = scope.spawn(|| {
            pin_current_thread(gen_cpu)?;
            tid.store(gettid(), Ordering::SeqCst);
            flood_loop(&mut conns, &batch, until, max_bytes, &written)
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
    let until = Instant::now() + run;
    // Far above what a core completes in the run: a bound in count as well as time.
    let max = (run.as_secs_f64() * 200_000.0) as u64;
    let next = AtomicU64::new(0);
    let completed = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let first_error = std::sync::Mutex::new(None::<String>);
    let tls_seen = std::sync::Mutex::new(None::<String>);
    let workers = plan.handshake_workers.max(1);
    let tids: Vec<AtomicI32> = (0..workers).map(|_| AtomicI32::new(0)).collect();
    let gen_cpu = ctx.gen_cpu;
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for tid in &tids {
            let (next, completed, failed, first_error, tls_seen) =
                (&next, &completed, &failed, &first_error, &tls_seen);
            handles.push(scope.spawn(move || -> anyhow::Result<()> {
                pin_current_thread(gen_cpu)?;
                tid.store(gettid(), Ordering::SeqCst);
                while Instant::now() < until && !STOP.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= max {
                        break;
                    }
                    // A new user each time, so no per-user quota counts earlier sessions
                    // whose close the server has not processed yet.
                    let name = format!("bench-hs{}-{round}-{i}", transport.name());
                    match session(transport, tls, ctx, i as usize, &name) {
                        Ok((client, _)) => {
                            completed.fetch_add(1, Ordering::Relaxed);
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

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians over the rounds of one (server, transport, connections) flood.
struct FloodSummary {
    server: StreamServer,
    transport: StreamTransport,
    connections: usize,
    p2c: bool,
    pps: f64,
    offered_pps: f64,
    pps_per_core: Option<f64>,
    core_share: f64,
    core_busy_share: f64,
    process_ns_per_pkt: Option<f64>,
    generator_share: Option<f64>,
    lost: u64,
    far_end_drops: u64,
    /// Delivered plus what the far end dropped: what the server itself relayed.
    server_sent_pps: f64,
    runs: usize,
}

fn flood_summaries(r: &StreamResults) -> Vec<FloodSummary> {
    type Key = (StreamTransport, bool, usize, StreamServer);
    let mut groups: BTreeMap<Key, Vec<&FloodMeasure>> = BTreeMap::new();
    for (_, server, transport, connections, m) in &r.floods {
        groups
            .entry((*transport, m.p2c, *connections, *server))
            .or_default()
            .push(m);
    }
    groups
        .into_iter()
        .map(|((transport, p2c, connections, server), ms)| FloodSummary {
            server,
            transport,
            connections,
            p2c,
            pps: median(ms.iter().map(|m| m.pps()).collect()).unwrap_or(0.0),
            offered_pps: median(
                ms.iter()
                    .map(|m| m.offered as f64 / m.window_s.max(1e-9))
                    .collect(),
            )
            .unwrap_or(0.0),
            pps_per_core: median(ms.iter().filter_map(|m| m.pps_per_core()).collect()),
            core_share: median(ms.iter().map(|m| m.core_share()).collect()).unwrap_or(0.0),
            core_busy_share: median(ms.iter().map(|m| m.core_busy_share()).collect())
                .unwrap_or(0.0),
            process_ns_per_pkt: median(
                ms.iter()
                    .filter_map(|m| {
                        m.process_cpu_ns
                            .map(|ns| ns as f64 / m.delivered.max(1) as f64)
                    })
                    .collect(),
            ),
            generator_share: median(ms.iter().filter_map(|m| m.generator_share()).collect()),
            // Over a window in steady state, frames written but not relayed are what the
            // server lost (or still held): a hint, not an exact count.
            lost: ms
                .iter()
                .map(|m| m.offered.saturating_sub(m.delivered))
                .sum(),
            far_end_drops: ms.iter().map(|m| m.far_end_drops).sum(),
            server_sent_pps: median(
                ms.iter()
                    .map(|m| (m.delivered + m.far_end_drops) as f64 / m.window_s.max(1e-9))
                    .collect(),
            )
            .unwrap_or(0.0),
            runs: ms.len(),
        })
        .collect()
}

struct HandshakeSummary {
    server: StreamServer,
    transport: StreamTransport,
    per_s: f64,
    per_core_s: Option<f64>,
    core_share: f64,
    core_busy_share: f64,
    process_ns_per_handshake: Option<f64>,
    generator_share: Option<f64>,
    failed: u64,
    first_error: Option<String>,
    tls: Option<String>,
    runs: usize,
}

fn handshake_summaries(r: &StreamResults) -> Vec<HandshakeSummary> {
    let mut groups: BTreeMap<(StreamTransport, StreamServer), Vec<&HandshakeMeasure>> =
        BTreeMap::new();
    for (_, server, transport, h) in &r.handshakes {
        groups.entry((*transport, *server)).or_default().push(h);
    }
    groups
        .into_iter()
        .map(|((transport, server), hs)| HandshakeSummary {
            server,
            transport,
            per_s: median(hs.iter().map(|h| h.per_s()).collect()).unwrap_or(0.0),
            per_core_s: median(hs.iter().filter_map(|h| h.per_core_s()).collect()),
            core_share: median(hs.iter().map(|h| h.core_share()).collect()).unwrap_or(0.0),
            core_busy_share: median(
                hs.iter()
                    .map(|h| h.core_cpu_ns as f64 / 1e9 / h.window_s.max(1e-9))
                    .collect(),
            )
            .unwrap_or(0.0),
            process_ns_per_handshake: median(
                hs.iter()
                    .filter_map(|h| {
                        h.process_cpu_ns
                            .map(|ns| ns as f64 / h.completed.max(1) as f64)
                    })
                    .collect(),
            ),
            generator_share: median(hs.iter().filter_map(|h| h.generator_share()).collect()),
            failed: hs.iter().map(|h| h.failed).sum(),
            first_error: hs.iter().find_map(|h| h.first_error.clone()),
            tls: hs.iter().find_map(|h| h.tls.clone()),
            runs: hs.len(),
        })
        .collect()
}

/// relay / coturn for every figure both have, keyed like "tcp_x1_relayed_pps_per_core".
fn ratios(r: &StreamResults) -> BTreeMap<String, f64> {
    let floods = flood_summaries(r);
    let hs = handshake_summaries(r);
    let mut out = BTreeMap::new();
    let mut put = |key: String, a: Option<f64>, b: Option<f64>| {
        if let (Some(a), Some(b)) = (a, b) {
            if b > 0.0 {
                out.insert(key, a / b);
            }
        }
    };
    for f in floods.iter().filter(|f| f.server == StreamServer::Relay) {
        let Some(c) = floods.iter().find(|c| {
            c.server == StreamServer::Coturn
                && c.transport == f.transport
                && c.connections == f.connections
                && c.p2c == f.p2c
        }) else {
            continue;
        };
        let key = format!(
            "{}_x{}{}",
            f.transport.name(),
            f.connections,
            if f.p2c { "_p2c" } else { "" }
        );
        put(format!("{key}_relayed_pps"), Some(f.pps), Some(c.pps));
        put(
            format!("{key}_relayed_pps_per_core"),
            f.pps_per_core,
            c.pps_per_core,
        );
    }
    for h in hs.iter().filter(|h| h.server == StreamServer::Relay) {
        let Some(c) = hs
            .iter()
            .find(|c| c.server == StreamServer::Coturn && c.transport == h.transport)
        else {
            continue;
        };
        let key = h.transport.name();
        put(
            format!("{key}_handshakes_per_s"),
            Some(h.per_s),
            Some(c.per_s),
        );
        put(
            format!("{key}_handshakes_per_core_s"),
            h.per_core_s,
            c.per_core_s,
        );
    }
    out
}

/// The target per transport: relay >= 2x coturn on relayed pps per relay core, at
/// every connection count both ran. None when either side has no figure.
fn target(r: &StreamResults) -> BTreeMap<&'static str, Option<bool>> {
    let ratios = ratios(r);
    [StreamTransport::Tcp, StreamTransport::Tls]
        .into_iter()
        .map(|t| {
            let prefix = format!("{}_x", t.name());
            let mine: Vec<f64> = ratios
                .iter()
                .filter(|(k, _)| {
                    k.starts_with(&prefix)
                        && !k.contains("_p2c")
                        && k.ends_with("_relayed_pps_per_core")
                })
                .map(|(_, v)| *v)
                .collect();
            (
                t.name(),
                (!mine.is_empty()).then(|| mine.iter().all(|v| *v >= 2.0)),
            )
        })
        .collect()
}

/// One group of the SVG's stream panel: its label ("tcp x1") and each server's relayed pps
/// per relay core (by the path whose colour it takes; None: n/a).
pub type SvgGroup = (String, Vec<(PathKind, Option<f64>)>);

/// The SVG's stream panel: its groups, and one line of handshakes per second per server and
/// transport.
pub fn svg_data(r: &StreamResults) -> (Vec<SvgGroup>, Vec<String>) {
    let floods = flood_summaries(r);
    let mut groups: Vec<SvgGroup> = Vec::new();
    let Some(plan) = &r.plan else {
        return (groups, Vec::new());
    };
    for &transport in &plan.transports {
        for &connections in &plan.connections {
            let bars = r
                .servers
                .iter()
                .map(|&server| {
                    let v = floods
                        .iter()
                        .find(|f| {
                            f.server == server
                                && f.transport == transport
                                && f.connections == connections
                                && !f.p2c
                        })
                        .and_then(|f| f.pps_per_core);
                    (server.path(), v)
                })
                .collect();
            groups.push((format!("{} x{connections}", transport.name()), bars));
        }
    }
    let lines = handshake_summaries(r)
        .iter()
        .map(|h| {
            format!(
                "{} {}: {:.0} handshakes/s ({} per relay core-s)",
                h.server.name(),
                h.transport.name(),
                h.per_s,
                h.per_core_s.map_or("-".to_owned(), |v| format!("{v:.0}"))
            )
        })
        .collect();
    (groups, lines)
}

/// The stream section of the terminal/markdown table.
pub fn table(r: &StreamResults) -> String {
    let mut t = String::new();
    if r.plan.is_none() {
        return t;
    }
    let _ = writeln!(
        t,
        "\nstream clients (TURN over TCP/TLS -> UDP peer), 120 B ChannelData client->peer:"
    );
    let _ = writeln!(
        t,
        "| server | transport | conns | direction | relayed kpps | kpps/relay core | server cpu | core busy | ns/pkt (process) | generator | offered kpps | fe drops |"
    );
    let _ = writeln!(
        t,
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for f in flood_summaries(r) {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} | {:.1} | {} | {:.0}% | {:.0}% | {} | {}{} | {:.1} | {} |",
            f.server.name(),
            f.transport.name(),
            f.connections,
            if f.p2c { "p>c" } else { "c>p" },
            f.pps / 1e3,
            opt_k(f.pps_per_core),
            100.0 * f.core_share,
            100.0 * f.core_busy_share,
            f.process_ns_per_pkt
                .map_or("-".to_owned(), |v| format!("{v:.0}")),
            share(f.generator_share),
            if f.generator_share.is_some_and(|g| g > GENERATOR_LIMIT_SHARE) {
                " (limit?)"
            } else {
                ""
            },
            f.offered_pps / 1e3,
            f.far_end_drops,
        );
    }
    let _ = writeln!(
        t,
        "\n| server | transport | handshakes/s | per relay core-s | server cpu | core busy | generator | failed |"
    );
    let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---:|---:|");
    for h in handshake_summaries(r) {
        let _ = writeln!(
            t,
            "| {} | {} | {:.0} | {} | {:.0}% | {:.0}% | {} | {} |",
            h.server.name(),
            h.transport.name(),
            h.per_s,
            h.per_core_s.map_or("-".to_owned(), |v| format!("{v:.0}")),
            100.0 * h.core_share,
            100.0 * h.core_busy_share,
            share(h.generator_share),
            h.failed
        );
    }
    let _ = writeln!(
        t,
        "(relayed: at the peer's sink in the window; fe drops: frames the relay namespace's veth \
         could not hand to the far end, summed over rounds: the server sent them, the far end on \
         the generator core lost them; server cpu: its threads + relay-side NAPI; core busy: \
         anything on the relay core; generator: its threads' share of the generator core)"
    );
    let ratios = ratios(r);
    if !ratios.is_empty() {
        let _ = writeln!(t, "\nrelay / coturn (same run):");
        for (k, v) in &ratios {
            let _ = writeln!(t, "  {k}: {v:.2}x");
        }
    }
    for (transport, met) in target(r) {
        let _ = writeln!(
            t,
            "  target relay >= 2x coturn relayed pps per core over {transport}: {}",
            match met {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "no comparison (a side is unavailable)",
            }
        );
    }
    for (server, reason) in &r.unavailable {
        let _ = writeln!(
            t,
            "  {} stream: unavailable: {}",
            server.name(),
            first_line(reason)
        );
    }
    for note in &r.notes {
        let _ = writeln!(t, "  note: {}", first_line(note));
    }
    for ((server, transport), reason) in &r.not_applicable {
        let _ = writeln!(
            t,
            "  {} {}: n/a: {}",
            server.name(),
            transport.name(),
            first_line(reason)
        );
    }
    t
}

/// The stream section of bench.json.
pub fn json(r: &StreamResults) -> Value {
    let Some(plan) = &r.plan else {
        return Value::Null;
    };
    let availability: serde_json::Map<String, Value> = r
        .servers
        .iter()
        .map(|s| {
            let reason = r.unavailable.get(s);
            (
                s.name().to_owned(),
                json!({ "available": reason.is_none(), "reason": reason }),
            )
        })
        .collect();
    json!({
        "conditions": {
            "transports": plan.transports.iter().map(|t| t.name()).collect::<Vec<_>>(),
            "connections": plan.connections,
            "payload_bytes": PAYLOAD,
            "warmup_seconds": plan.warmup.as_secs_f64(),
            "window_seconds": plan.window.as_secs_f64(),
            "handshake_workers": plan.handshake_workers,
            "settle": format!("before each measurement, up to {:.1} s until the relay core is \
                below 30 % busy over 100 ms (settle_s per run)", plan.settle_limit.as_secs_f64()),
            "peer_to_client": plan.p2c.then_some("after each client->peer flood, the peer sends \
                120 B datagrams to the relayed addresses paced at 1.5x that flood's relayed rate \
                (socket generator, generator core); the clients read the streams and count the \
                ChannelData (generator core too: its share covers both threads)"),
            "ports": { "tcp": TCP_PORT, "tls": TLS_PORT },
            "relay": "relay serve --fastpath off (the socket path serves stream clients) with \
                      --listen-tcp, --listen-tls, --tls-cert, --tls-key",
            "coturn": "turnserver with TCP on its listening port and TLS on --tls-listening-port \
                       (--cert/--pkey)",
            "generator": "one thread on the generator core writing 128-frame batches of \
                          ChannelData to every connection, non-blocking (rustls with ring for \
                          TLS); handshakes from threads on the generator core, each a new \
                          connection from the next client address, TLS without resumption",
            "tls_client": "rustls (ring), TLS 1.2/1.3, certificate pinned, handshake signature \
                           not verified (so the generator core is not the limit)",
            "certificate": "self-signed ECDSA P-256 made at run time (rcgen), removed afterwards",
            "measured": "over a window after a warm-up, while the generator still runs: \
                         datagrams at the peer's far-end sink, the relay core's busy time \
                         (/proc/stat), the server's and the generator's thread CPU time \
                         (schedstat)",
            "per_core": "relayed datagrams (or completed handshakes) per second of the server's \
                         CPU time: its threads plus the relay-side veth NAPI threads (where its \
                         TCP receive work runs), all pinned to the relay core; the core's own \
                         busy share (relay_core_busy_share) also counts other jobs on a shared \
                         machine",
        },
        "availability": availability,
        "floods": r.floods.iter().map(|(round, server, transport, connections, m)| json!({
            "round": round,
            "server": server.name(),
            "transport": transport.name(),
            "connections": connections,
            "window_s": m.window_s,
            "offered": m.offered,
            "delivered": m.delivered,
            "delivered_pps": m.pps(),
            "relayed_pps_per_core": m.pps_per_core(),
            "relay_core_busy_ns": m.core_cpu_ns,
            "process_cpu_ns": m.process_cpu_ns,
            "server_cpu_ns": m.server_cpu_ns,
            "far_end_drops": m.far_end_drops,
            "generator_cpu_ns": m.generator_cpu_ns,
            "direction": if m.p2c { "peer->client" } else { "client->peer" },
            "sent_total": m.total_frames,
            "settle_s": m.settle_s,
        })).collect::<Vec<_>>(),
        "summary": flood_summaries(r).iter().map(|f| json!({
            "server": f.server.name(),
            "transport": f.transport.name(),
            "connections": f.connections,
            "direction": if f.p2c { "peer->client" } else { "client->peer" },
            "delivered_pps": f.pps,
            "offered_pps": f.offered_pps,
            "relayed_pps_per_core": f.pps_per_core,
            "server_cpu_share": f.core_share,
            "relay_core_busy_share": f.core_busy_share,
            "process_cpu_ns_per_packet": f.process_ns_per_pkt,
            "generator_cpu_share": f.generator_share,
            "generator_limited": f.generator_share.map(|g| g > GENERATOR_LIMIT_SHARE),
            "written_not_relayed": f.lost,
            "far_end_drops": f.far_end_drops,
            "sent_by_server_pps": f.server_sent_pps,
            "runs": f.runs,
        })).collect::<Vec<_>>(),
        "handshake_runs": r.handshakes.iter().map(|(round, server, transport, h)| json!({
            "round": round,
            "server": server.name(),
            "transport": transport.name(),
            "window_s": h.window_s,
            "completed": h.completed,
            "failed": h.failed,
            "first_error": h.first_error,
            "relay_core_busy_ns": h.core_cpu_ns,
            "process_cpu_ns": h.process_cpu_ns,
            "server_cpu_ns": h.server_cpu_ns,
            "generator_cpu_ns": h.generator_cpu_ns,
            "settle_s": h.settle_s,
        })).collect::<Vec<_>>(),
        "handshakes": handshake_summaries(r).iter().map(|h| json!({
            "server": h.server.name(),
            "transport": h.transport.name(),
            "per_s": h.per_s,
            "per_relay_core_s": h.per_core_s,
            "server_cpu_share": h.core_share,
            "relay_core_busy_share": h.core_busy_share,
            "process_cpu_ns_per_handshake": h.process_ns_per_handshake,
            "generator_cpu_share": h.generator_share,
            "generator_limited": h.generator_share.map(|g| g > GENERATOR_LIMIT_SHARE),
            "failed": h.failed,
            "first_error": h.first_error,
            "tls": h.tls,
            "runs": h.runs,
        })).collect::<Vec<_>>(),
        "ratios_relay_over_coturn": ratios(r),
        "target": "relay >= 2x coturn 4.6.1 on relayed pps (per relay core) over TCP and TLS",
        "target_met": target(r),
        "notes": r.notes,
        "not_applicable": r.not_applicable.iter().map(|((s, t), reason)| json!({
            "server": s.name(),
            "transport": t.name(),
            "reason": reason,
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_framing_pads_channel_data_and_sizes_stun() {
        assert_eq!(frame_len(&[0x40, 0x00, 0x00]).unwrap(), None);
        // ChannelData of 5 bytes: 4 + 5, padded to 12 on a stream.
        let mut cd = vec![0x40, 0x00, 0x00, 0x05];
        cd.resize(11, 0);
        assert_eq!(frame_len(&cd).unwrap(), None);
        cd.push(0);
        assert_eq!(frame_len(&cd).unwrap(), Some(12));
        // STUN: 20-byte header plus the length field.
        let mut stun = vec![0x01, 0x01, 0x00, 0x08];
        stun.resize(28, 0);
        assert_eq!(frame_len(&stun).unwrap(), Some(28));
        assert_eq!(frame_len(&stun[..27]).unwrap(), None);
        assert!(frame_len(&[0xc0, 0, 0, 0]).is_err());
    }

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

    fn flood_m(delivered: u64, core_ms: u64) -> FloodMeasure {
        FloodMeasure {
            window_s: 1.0,
            offered: delivered,
            delivered,
            server_cpu_ns: Some(core_ms * 1_000_000),
            ..FloodMeasure::default()
        }
    }

    #[test]
    fn ratios_and_target_compare_relay_with_coturn_per_core() {
        let mut r = StreamResults::default();
        for (server, pps, core_ms) in [
            (StreamServer::Relay, 300_000, 1000),
            (StreamServer::Coturn, 100_000, 500),
        ] {
            r.floods
                .push((0, server, StreamTransport::Tcp, 1, flood_m(pps, core_ms)));
        }
        // TLS: the relay only 1.5x per core.
        for (server, pps) in [
            (StreamServer::Relay, 150_000),
            (StreamServer::Coturn, 100_000),
        ] {
            r.floods
                .push((0, server, StreamTransport::Tls, 1, flood_m(pps, 1000)));
        }
        let ratios = ratios(&r);
        assert!((ratios["tcp_x1_relayed_pps"] - 3.0).abs() < 1e-9);
        // 300k per core-second against 200k.
        assert!((ratios["tcp_x1_relayed_pps_per_core"] - 1.5).abs() < 1e-9);
        assert!((ratios["tls_x1_relayed_pps_per_core"] - 1.5).abs() < 1e-9);
        let target = target(&r);
        assert_eq!(target["tcp"], Some(false));
        assert_eq!(target["tls"], Some(false));
        r.floods.retain(|f| f.1 == StreamServer::Relay);
        assert_eq!(super::target(&r)["tcp"], None);
    }
}
