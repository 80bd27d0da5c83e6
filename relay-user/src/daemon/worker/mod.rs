//! One worker: a thread with its own single-threaded runtime, its own SO_REUSEPORT listener
//! sockets, its own sans-IO [`Server`] and the relay sockets of the allocations it created.
//!
//! The kernel spreads clients over the workers' listener sockets by address hash, so a client
//! always reaches the same worker and no protocol state is shared between workers (only the
//! quota ledger and the kernel fast path, behind short locks).
//!
//! One loop drives everything. The worker's sockets (listeners and every relay socket) sit in
//! one epoll instance, which is the only descriptor registered with tokio; a wake asks epoll
//! which sockets are readable, receives one batch from each into the worker's arena, lets the
//! core decide about every datagram in place (a [`Forward`] names the socket, the destination
//! and the bytes; the ChannelData header towards a client goes into the headroom in front of
//! the datagram), queues the transmits as ranges of the arena, executes the core's control
//! commands, and flushes all transmits at the end, grouped per socket, as GSO runs and
//! `sendmmsg` batches. No reader tasks, no channel between sockets and core, no copy of relayed
//! data. Timers, admin requests and the stop signal are the loop's other inputs; its fast-path
//! map updates happen in the order the server decided them.
//!
//! TCP and TLS clients (RFC 8656 §5) live in the same loop: their listener and connection
//! sockets sit in the same epoll; each connection's byte stream is framed into messages that
//! the core handles like datagrams, and whatever goes to such a client is queued on its
//! connection (see [`streams`]). Their relayed side is the same UDP relay sockets.
//!
//! Why epoll inside tokio and not tokio sockets or a thread of its own: an `AsyncFd` per socket
//! would need a task or a poll per socket per wake (with 1000 allocations, 1000 polls to find
//! the few with data); raw epoll reports just the ready ones. Registering the epoll descriptor
//! with the worker's runtime keeps admin requests, the stop signal and timers as they are
//! (tokio channels and sleeps) without an eventfd protocol of our own.

mod streams;

pub use streams::StreamEnv;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex, MutexGuard},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::{mpsc, oneshot, watch},
};
use tracing::{debug, warn};

use super::{
    aggregate::ChannelMemo,
    connection::{CloseReason, Connection},
    kernel_sync::KernelSync,
    usage::{UsageLog, UsageRecord},
};
use crate::{
    control::{AllocationView, ChannelView, PathCounters},
    net::{
        self,
        epoll::Epoll,
        recv::{Arena, Datagram, HEADROOM},
        send::SendQueue,
    },
};
use rand::rngs::StdRng;
use relay_proto::{
    server::{AllocationId, Command, Forward, Reconfigure, ReconfigureReport, Server},
    Transport,
};

/// Receive slots of a worker (each a whole 64 KiB datagram or GRO aggregate behind headroom;
/// only the pages datagrams land in are ever touched). When they are all filled before a wake
/// ends, the queued transmits are flushed and the slots reused.
const ARENA_SLOTS: usize = 128;
/// epoll rounds per wake before timers, admin requests and the stop signal get a turn.
const IO_ROUNDS: usize = 4;

/// What the admin router asks one worker.
#[derive(Debug)]
pub enum WorkerRequest {
    /// The worker's allocations.
    List(oneshot::Sender<Vec<AllocationView>>),
    /// Move an allocation of this worker between kernel and socket path.
    SetFastPath {
        allocation: AllocationId,
        on: bool,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Counts for metrics.
    Snapshot(oneshot::Sender<WorkerSnapshot>),
    /// A reload's credentials, peer policy and caps for this worker's core; what it withdrew.
    Reconfigure {
        update: Box<Reconfigure>,
        reply: oneshot::Sender<ReconfigureReport>,
    },
    /// End allocations for the operator (`relay ctl disconnect`); answers the ids ended.
    Disconnect {
        target: DisconnectTarget,
        reply: oneshot::Sender<Vec<AllocationId>>,
    },
}

/// Which allocations `relay ctl disconnect` ends.
#[derive(Clone, Debug)]
pub enum DisconnectTarget {
    Allocation(AllocationId),
    /// Every allocation of this user (a REST username by its user part).
    User(String),
}

/// One worker's share of the metrics.
#[derive(Clone, Debug, Default)]
pub struct WorkerSnapshot {
    pub allocations: u64,
    pub permissions: u64,
    pub channels: u64,
    pub socket_totals: PathCounters,
    pub send_drops: u64,
    pub allocation_ids: Vec<AllocationId>,
    /// Error responses sent, by (method label, code).
    pub error_responses: BTreeMap<(&'static str, u16), u64>,
    /// Allocations by client transport (udp, tcp, tls).
    pub allocations_by_transport: BTreeMap<&'static str, u64>,
    /// Open TCP/TLS connections by transport.
    pub connections: BTreeMap<&'static str, u64>,
    /// Closed TCP/TLS connections by (transport, reason).
    pub connections_closed: BTreeMap<(&'static str, &'static str), u64>,
    /// Messages to TCP/TLS clients dropped for a full send queue.
    pub stream_send_drops: u64,
    /// Bytes the open connections hold in their own buffers.
    pub stream_buffered_bytes: u64,
}

/// Locks the shared fast-path state; a panic elsewhere cannot leave it half-updated in a way
/// that matters more than stopping the relay would.
pub fn lock(kernel: &Mutex<KernelSync>) -> MutexGuard<'_, KernelSync> {
    kernel.lock().unwrap_or_else(|e| e.into_inner())
}

/// Seconds since the Unix epoch (REST credential expiry is wall-clock based).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a socket of the worker is for.
#[derive(Clone, Copy, Debug)]
enum Role {
    /// A UDP listener bound on this address (possibly a wildcard one).
    Listener(SocketAddr),
    /// The relay socket of an allocation.
    Relay {
        id: AllocationId,
        relayed: SocketAddr,
    },
    /// A TCP listener for TCP or TLS clients.
    StreamListener { transport: Transport },
    /// A TCP or TLS client connection.
    Stream,
}

/// The socket itself.
enum Io {
    Udp(UdpSocket),
    Listener(TcpListener),
    Stream(Box<Connection>),
}

impl Io {
    fn raw_fd(&self) -> RawFd {
        match self {
            Io::Udp(socket) => socket.as_raw_fd(),
            Io::Listener(listener) => listener.as_raw_fd(),
            Io::Stream(connection) => connection.stream().as_raw_fd(),
        }
    }
}

struct Entry {
    socket: Io,
    generation: u32,
    role: Role,
    /// What the socket path relayed through this relay socket.
    counters: PathCounters,
}

/// The worker's sockets, named by a token (slot index and generation) that epoll reports and
/// transmits carry, so a socket closed and its slot reused is never mistaken for the new one.
#[derive(Default)]
struct Sockets {
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
    generation: u32,
}

impl Sockets {
    fn insert(&mut self, socket: Io, role: Role) -> u64 {
        self.generation = self.generation.wrapping_add(1);
        let entry = Entry {
            socket,
            generation: self.generation,
            role,
            counters: PathCounters::default(),
        };
        let index = match self.free.pop() {
            Some(index) => {
                self.entries[index] = Some(entry);
                index
            }
            None => {
                self.entries.push(Some(entry));
                self.entries.len() - 1
            }
        };
        (u64::from(self.generation) << 32) | index as u64
    }

    fn split(token: u64) -> (usize, u32) {
        ((token & 0xffff_ffff) as usize, (token >> 32) as u32)
    }

    fn get(&self, token: u64) -> Option<&Entry> {
        let (index, generation) = Self::split(token);
        self.entries
            .get(index)?
            .as_ref()
            .filter(|e| e.generation == generation)
    }

    fn get_mut(&mut self, token: u64) -> Option<&mut Entry> {
        let (index, generation) = Self::split(token);
        self.entries
            .get_mut(index)?
            .as_mut()
            .filter(|e| e.generation == generation)
    }

    fn remove(&mut self, token: u64) -> Option<Entry> {
        self.get(token)?;
        let (index, _) = Self::split(token);
        self.free.push(index);
        self.entries.get_mut(index)?.take()
    }

    /// The descriptor of UDP socket `token` (transmits only ever name UDP sockets).
    fn fd(&self, token: u64) -> Option<RawFd> {
        match self.get(token).map(|e| &e.socket) {
            Some(Io::Udp(socket)) => Some(socket.as_raw_fd()),
            _ => None,
        }
    }

    /// Connection `token`.
    fn stream_mut(&mut self, token: u64) -> Option<&mut Connection> {
        match self.get_mut(token).map(|e| &mut e.socket) {
            Some(Io::Stream(connection)) => Some(connection),
            _ => None,
        }
    }
}

/// Faults a test can inject through hidden `relay serve` flags (issue 12: a failure must be
/// loud and contained, and a test must be able to cause one).
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// The first this many receive calls fail with ENOMEM, as the kernel can.
    pub receive_errors: u32,
    /// The worker panics after relaying this many client datagrams (0: never).
    pub panic_after_datagrams: u64,
}

pub struct Worker {
    server: Server<StdRng>,
    faults: Faults,
    /// Client datagrams seen (for [`Faults::panic_after_datagrams`]).
    client_datagrams: u64,
    /// Receive errors in a row; the loop backs off while there are any.
    receive_failures: u32,
    epoll: AsyncFd<Epoll>,
    sockets: Sockets,
    /// Listener address → token.
    listeners: HashMap<SocketAddr, u64>,
    /// Relayed address → token of its relay socket.
    relays: HashMap<SocketAddr, u64>,
    /// Tokens epoll reported in this round, with whether each is writable.
    ready: Vec<(u64, bool)>,
    /// What TCP/TLS clients need: certificates, caps, timeouts.
    stream_env: StreamEnv,
    /// (client, local address, transport) → connection token.
    streams: HashMap<(SocketAddr, SocketAddr, Transport), u64>,
    /// Connections with output queued since the last flush.
    dirty_streams: Vec<u64>,
    /// Connections whose last turn ended with input left to read.
    unfinished_streams: Vec<u64>,
    /// TCP/TLS listeners out of epoll after accept failed (descriptors ran out).
    paused_listeners: Vec<u64>,
    /// Closed connections by (transport, reason), for metrics.
    streams_closed: BTreeMap<(&'static str, &'static str), u64>,
    /// Messages to stream clients dropped for a full queue.
    stream_drops: u64,
    arena: Arena,
    /// The datagrams of the last receive batch.
    datagrams: Vec<Datagram>,
    /// The core's decision for the current GRO aggregate's ChannelData.
    memo: ChannelMemo,
    sends: SendQueue,
    /// Datagrams the socket path dropped on send (full buffers, refused sends).
    send_drops: u64,
    /// Socket-path totals, including allocations that are gone (for metrics).
    socket_totals: PathCounters,
    kernel: Arc<Mutex<KernelSync>>,
    /// Where usage records go.
    usage: Arc<UsageLog>,
    /// (socket, kernel) counters of allocations whose relay sockets closed in this round of
    /// commands, until their usage record is written.
    ending: HashMap<AllocationId, (PathCounters, PathCounters)>,
}

impl Worker {
    /// A worker without sockets; must be called inside the worker's runtime.
    pub fn new(
        server: Server<StdRng>,
        kernel: Arc<Mutex<KernelSync>>,
        faults: Faults,
        stream_env: StreamEnv,
        usage: Arc<UsageLog>,
    ) -> io::Result<Self> {
        // SAFETY: the Epoll owns its descriptor (an OwnedFd it never replaces) for its whole
        // life, which the AsyncFd's is, and its as_raw_fd always returns that descriptor.
        let epoll = unsafe { AsyncFd::register_with_interest(Epoll::new()?, Interest::READABLE) }?;
        Ok(Self {
            server,
            faults,
            client_datagrams: 0,
            receive_failures: 0,
            epoll,
            sockets: Sockets::default(),
            listeners: HashMap::new(),
            relays: HashMap::new(),
            ready: Vec::with_capacity(256),
            stream_env,
            streams: HashMap::new(),
            dirty_streams: Vec::new(),
            unfinished_streams: Vec::new(),
            paused_listeners: Vec::new(),
            streams_closed: BTreeMap::new(),
            stream_drops: 0,
            arena: Arena::new(ARENA_SLOTS, net::MAX_DATAGRAM),
            datagrams: Vec::with_capacity(net::recv::RECV_BATCH * 64),
            memo: ChannelMemo::default(),
            sends: SendQueue::default(),
            send_drops: 0,
            socket_totals: PathCounters::default(),
            kernel,
            usage,
            ending: HashMap::new(),
        })
    }

    /// Starts serving clients on a bound listener socket.
    pub fn add_listener(&mut self, addr: SocketAddr, socket: UdpSocket) -> io::Result<()> {
        let fd = socket.as_raw_fd();
        let token = self.sockets.insert(Io::Udp(socket), Role::Listener(addr));
        if let Err(error) = self.epoll.get_ref().add(fd, token) {
            self.sockets.remove(token);
            return Err(error);
        }
        self.listeners.insert(addr, token);
        Ok(())
    }

    /// Runs until `stop` turns true, then releases the worker's allocations (their kernel
    /// entries first) and relay sockets; returns how many relay sockets it released.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<WorkerRequest>,
        mut stop: watch::Receiver<bool>,
    ) -> usize {
        // epoll still had ready sockets when the last wake ended its rounds.
        let mut io_pending = false;
        // Connection deadlines (handshake, idle, stalled) are checked once a second.
        let mut sweep = tokio::time::interval(streams::SWEEP_INTERVAL);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(pause) = self.receive_backoff() {
                tokio::time::sleep(pause).await;
            }
            let deadline = self.server.poll_timeout();
            let timer = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let mut io = false;
            let mut timeout = false;
            let mut request = None;
            let mut sweep_due = false;
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                }
                ready = self.epoll.readable(), if !io_pending => match ready {
                    // Cleared before epoll is asked, so readiness arriving meanwhile wakes
                    // the loop again.
                    Ok(mut guard) => {
                        guard.clear_ready();
                        io = true;
                    }
                    Err(error) => {
                        warn!(%error, "worker epoll failed; worker stopped");
                        break;
                    }
                },
                () = std::future::ready(()), if io_pending => io = true,
                () = timer => timeout = true,
                Some(r) = requests.recv() => request = Some(r),
                _ = sweep.tick(), if !self.streams.is_empty() || !self.paused_listeners.is_empty() => {
                    sweep_due = true;
                }
            }
            if io {
                io_pending = self.poll_io();
            }
            if timeout {
                self.server.handle_timeout(Instant::now());
                self.drain_commands(None);
            }
            if let Some(request) = request {
                self.request(request);
            }
            if sweep_due {
                self.sweep_streams(Instant::now());
            }
            self.flush();
        }
        self.close()
    }

    /// Receives from every socket epoll reports readable, a batch each, round after round;
    /// whether sockets were still ready after the last round.
    fn poll_io(&mut self) -> bool {
        for _ in 0..IO_ROUNDS {
            self.ready.clear();
            // Connections that had more to read than one turn allowed (TLS may hold
            // decrypted data that no readiness will report again).
            self.ready.extend(
                self.unfinished_streams
                    .drain(..)
                    .map(|token| (token, false)),
            );
            match self.epoll.get_mut().ready() {
                Ok(tokens) => self.ready.extend(tokens),
                Err(error) => {
                    warn!(%error, "epoll_wait failed");
                    return false;
                }
            }
            if self.ready.is_empty() {
                return false;
            }
            let now = Instant::now();
            self.server.set_unix_time(unix_now());
            for i in 0..self.ready.len() {
                let (token, writable) = self.ready[i];
                match self.sockets.get(token).map(|e| e.role) {
                    Some(Role::StreamListener { transport }) => self.accept(token, transport, now),
                    Some(Role::Stream) => self.stream_ready(token, writable, now),
                    Some(_) => self.receive(token, now),
                    None => {}
                }
            }
            self.flush();
        }
        true
    }

    /// How long to pause before the next wake after receive errors in a row: 1 ms doubling up
    /// to 256 ms, none once a receive succeeds.
    fn receive_backoff(&self) -> Option<std::time::Duration> {
        (self.receive_failures > 0).then(|| {
            std::time::Duration::from_millis(1 << self.receive_failures.min(9).saturating_sub(1))
        })
    }

    /// One receive batch from socket `token`, each datagram decided and queued.
    fn receive(&mut self, token: u64, now: Instant) {
        let Some(entry) = self.sockets.get(token) else {
            return;
        };
        let (fd, role) = (entry.socket.raw_fd(), entry.role);
        if self.arena.free() == 0 {
            self.flush();
        }
        self.datagrams.clear();
        let received = if self.faults.receive_errors > 0 {
            self.faults.receive_errors -= 1;
            Err(io::Error::from_raw_os_error(libc::ENOMEM))
        } else {
            self.arena.recv(fd, &mut self.datagrams)
        };
        match received {
            Ok(_) => self.receive_failures = 0,
            Err(error) if transient(&error) => return,
            Err(error) => {
                // Never stop reading a socket: a listener stays in its SO_REUSEPORT group, and
                // the kernel keeps hashing its clients to it. The loop backs off instead
                // (`receive_backoff`), so a lasting error cannot spin the worker.
                self.receive_failures = self.receive_failures.saturating_add(1);
                if self.receive_failures.is_power_of_two() {
                    warn!(
                        ?role,
                        %error,
                        failures = self.receive_failures,
                        "receive failed; retrying with backoff"
                    );
                }
                return;
            }
        }
        if matches!(role, Role::Listener(_)) && self.faults.panic_after_datagrams > 0 {
            self.client_datagrams += self.datagrams.len() as u64;
            if self.client_datagrams >= self.faults.panic_after_datagrams {
                panic!("fault injected by --fault-panic-worker-after (tests only)");
            }
        }
        for i in 0..self.datagrams.len() {
            let datagram = self.datagrams[i];
            match role {
                Role::Listener(listener) => self.client_datagram(listener, &datagram, now),
                Role::Relay { relayed, .. } => self.peer_datagram(token, relayed, &datagram, now),
                Role::StreamListener { .. } | Role::Stream => {}
            }
        }
    }

    fn client_datagram(&mut self, listener: SocketAddr, datagram: &Datagram, now: Instant) {
        // RFC 8656 §2: the 5-tuple holds the server address the client contacted, which on a
        // wildcard listener only the datagram itself knows.
        let local = match datagram.to {
            _ if !listener.ip().is_unspecified() => listener,
            Some(ip) => SocketAddr::new(ip, listener.port()),
            None => {
                debug!(client = %datagram.from, %listener, "no destination address; datagram dropped");
                return;
            }
        };
        if datagram.headroom {
            // The first datagram of a received message.
            self.memo.forget();
        }
        let data = self.arena.bytes().get(datagram.range()).unwrap_or_default();
        if let Some(forward) = self.memo.lookup(datagram.from, local, data) {
            self.relay(forward, datagram, None);
            return;
        }
        let forward = self
            .server
            .handle_client_datagram(datagram.from, local, data, now);
        self.memo
            .remember(datagram.from, local, data, forward.as_ref());
        if let Some(forward) = forward {
            self.relay(forward, datagram, None);
        }
        self.drain_commands(None);
    }

    fn peer_datagram(
        &mut self,
        token: u64,
        relayed: SocketAddr,
        datagram: &Datagram,
        now: Instant,
    ) {
        let data = self.arena.bytes().get(datagram.range()).unwrap_or_default();
        let forward = self
            .server
            .handle_peer_datagram(relayed, datagram.from, data, now);
        if let Some(forward) = forward {
            self.relay(forward, datagram, Some(token));
        }
        self.drain_commands(Some((token, datagram.len)));
    }

    /// Queues a relayed datagram where the core decided, from where it lies in the arena.
    fn relay(&mut self, forward: Forward, datagram: &Datagram, from_relay: Option<u64>) {
        match forward {
            Forward::ToPeer {
                relayed,
                peer,
                payload,
            } => {
                let Some(&token) = self.relays.get(&relayed) else {
                    return;
                };
                self.count(token, true, payload.len());
                self.sends.push_arena(
                    token,
                    peer,
                    None,
                    datagram.start + payload.start,
                    payload.len(),
                );
            }
            Forward::ToClient {
                listener,
                client,
                header,
                transport,
            } => {
                // The peer's payload, as the kernel counts it (not the ChannelData framing).
                if let Some(token) = from_relay {
                    self.count(token, false, datagram.len);
                }
                if transport.is_stream() {
                    // A copy into the connection's queue (TCP has no zero-copy send here).
                    let data = self.arena.bytes().get(datagram.range()).unwrap_or_default();
                    let key = (client, listener, transport);
                    streams::queue_on(
                        &mut self.sockets,
                        &self.streams,
                        &mut self.dirty_streams,
                        &mut self.stream_drops,
                        key,
                        &[&header, data],
                    );
                    return;
                }
                let Some((socket, src)) = listener_socket(&self.listeners, listener) else {
                    return;
                };
                if self.arena.prepend(datagram, header) {
                    self.sends.push_arena(
                        socket,
                        client,
                        src,
                        datagram.start - HEADROOM,
                        datagram.len + HEADROOM,
                    );
                } else {
                    // Not sent alone (the second datagram of a GRO aggregate): no headroom.
                    let data = self.arena.bytes().get(datagram.range()).unwrap_or_default();
                    let owned = forward_copy(header, data);
                    self.sends.push_owned(socket, client, src, owned);
                }
            }
        }
    }

    /// Counts a datagram relayed through relay socket `token`.
    fn count(&mut self, token: u64, to_peer: bool, len: usize) {
        if let Some(entry) = self.sockets.get_mut(token) {
            let one = PathCounters::one(to_peer, len);
            entry.counters += one;
            self.socket_totals += one;
        }
    }

    /// Executes the server's commands in order (binding a relay socket may make it emit
    /// more): sends are queued for the flush, fast-path updates are applied at once, so a
    /// ChannelBind's binding is installed before its success response leaves. `from_relay`
    /// is the relay socket whose datagram (of that many bytes) caused them: its Data
    /// indication carries peer data, counted as the peer's payload, as the kernel counts it.
    fn drain_commands(&mut self, from_relay: Option<(u64, usize)>) {
        while let Some(command) = self.server.next_command() {
            match command {
                Command::SendToClient {
                    listener,
                    client,
                    payload,
                    transport,
                } => {
                    if let Some((token, peer_bytes)) = from_relay {
                        self.count(token, false, peer_bytes);
                    }
                    if transport.is_stream() {
                        streams::queue_on(
                            &mut self.sockets,
                            &self.streams,
                            &mut self.dirty_streams,
                            &mut self.stream_drops,
                            (client, listener, transport),
                            &[&payload],
                        );
                        continue;
                    }
                    match listener_socket(&self.listeners, listener) {
                        Some((socket, src)) => self.sends.push_owned(socket, client, src, payload),
                        None => debug!(%listener, "no listener socket; datagram dropped"),
                    }
                }
                Command::SendToPeer {
                    relayed,
                    peer,
                    payload,
                } => match self.relays.get(&relayed).copied() {
                    Some(token) => {
                        self.count(token, true, payload.len());
                        self.sends.push_owned(token, peer, None, payload);
                    }
                    None => debug!(%relayed, "relay socket closed; datagram dropped"),
                },
                Command::CreateAllocation { id, relayed } => self.open_relay(id, relayed),
                Command::DeleteAllocation { id, relayed } => {
                    // The kernel's counters are read as its entries go, the socket's as it
                    // closes: each path's count lands in the usage record once.
                    let kernel = lock(&self.kernel).end_allocation(id);
                    let socket = self.close_relay(id, relayed);
                    let counted = self.ending.entry(id).or_default();
                    counted.0 += socket;
                    counted.1 += kernel;
                }
                Command::CreateChannelBinding { .. }
                | Command::DeleteChannelBinding { .. }
                | Command::CreatePermission { .. }
                | Command::DeletePermission { .. } => lock(&self.kernel).apply(&command),
            }
        }
        self.write_usage();
    }

    /// Writes the usage record of every allocation that ended: the core noted the end with
    /// the commands that closed its sockets, all of which [`Worker::drain_commands`] has just
    /// executed, so its counters are complete.
    fn write_usage(&mut self) {
        if self.ending.is_empty() {
            return;
        }
        let (wall, now) = (SystemTime::now(), Instant::now());
        while let Some(end) = self.server.next_ended() {
            let (socket, kernel) = self.ending.remove(&end.id).unwrap_or_default();
            self.usage
                .write(&UsageRecord::new(&end, socket, kernel, wall, now));
        }
        // Allocations that never went live have no record.
        self.ending.clear();
    }

    /// Sends every queued transmit; the arena's slots are free again afterwards. Connections
    /// with new output write what their sockets take.
    fn flush(&mut self) {
        if !self.sends.is_empty() {
            let sockets = &self.sockets;
            let dropped = self
                .sends
                .flush(self.arena.bytes(), |token| sockets.fd(token));
            self.send_drops += dropped as u64;
        }
        self.arena.clear();
        self.flush_streams();
    }

    /// Binds the relay socket of a new allocation and tells the server how it went
    /// (RFC 8656 §7.2: the Allocate success is only sent once the address is really ours).
    fn open_relay(&mut self, id: AllocationId, relayed: SocketAddr) {
        let now = Instant::now();
        let bound = net::bind_relay(relayed).and_then(|socket| {
            let fd = socket.as_raw_fd();
            let token = self
                .sockets
                .insert(Io::Udp(socket), Role::Relay { id, relayed });
            match self.epoll.get_ref().add(fd, token) {
                Ok(()) => Ok(token),
                Err(error) => {
                    self.sockets.remove(token);
                    Err(error)
                }
            }
        });
        match bound {
            Ok(token) => {
                self.relays.insert(relayed, token);
                debug!(allocation = %id, %relayed, "relay socket bound");
                self.server.allocation_bound(id, now);
            }
            Err(error) => {
                debug!(allocation = %id, %relayed, %error, "relay port unavailable");
                self.server.allocation_bind_failed(id, now);
            }
        }
    }

    /// Closes a relay socket; returns what the socket path relayed through it.
    fn close_relay(&mut self, id: AllocationId, relayed: SocketAddr) -> PathCounters {
        let Some(&token) = self.relays.get(&relayed) else {
            return PathCounters::default();
        };
        match self.sockets.get(token).map(|e| e.role) {
            Some(Role::Relay { id: owner, .. }) if owner == id => {
                self.relays.remove(&relayed);
                let mut counters = PathCounters::default();
                if let Some(entry) = self.sockets.remove(token) {
                    self.epoll.get_ref().remove(entry.socket.raw_fd());
                    counters = entry.counters;
                }
                debug!(allocation = %id, %relayed, "relay socket closed");
                counters
            }
            _ => {
                warn!(allocation = %id, %relayed, "relay socket belongs to another allocation");
                PathCounters::default()
            }
        }
    }

    fn request(&mut self, request: WorkerRequest) {
        match request {
            WorkerRequest::List(reply) => {
                let _ = reply.send(self.allocation_views());
            }
            WorkerRequest::SetFastPath {
                allocation,
                on,
                reply,
            } => {
                let transport = self
                    .server
                    .allocations()
                    .find(|a| a.id == allocation)
                    .map(|a| a.transport);
                let result = match transport {
                    None => Err(format!("no allocation {allocation}")),
                    Some(transport) if on && transport.is_stream() => Err(format!(
                        "allocation {allocation} has a {} client: the kernel fast path forwards \
                         UDP clients only, so it stays on the socket path",
                        transport.label().to_uppercase()
                    )),
                    Some(_) => lock(&self.kernel).set_allocation(allocation, on),
                };
                let _ = reply.send(result);
            }
            WorkerRequest::Reconfigure { update, reply } => {
                let report = self.server.reconfigure(*update, Instant::now());
                // The withdrawn permissions' and channels' kernel entries go now, before the
                // reload answers.
                self.drain_commands(None);
                let _ = reply.send(report);
            }
            WorkerRequest::Snapshot(reply) => {
                let mut snapshot = WorkerSnapshot {
                    socket_totals: self.socket_totals,
                    send_drops: self.send_drops,
                    connections_closed: self.streams_closed.clone(),
                    stream_send_drops: self.stream_drops,
                    ..WorkerSnapshot::default()
                };
                self.stream_snapshot(&mut snapshot);
                for (method, code, count) in self.server.error_responses() {
                    *snapshot
                        .error_responses
                        .entry((method.label(), code.code()))
                        .or_insert(0) += count;
                }
                for a in self.server.allocations() {
                    snapshot.allocations += 1;
                    *snapshot
                        .allocations_by_transport
                        .entry(a.transport.label())
                        .or_insert(0) += 1;
                    snapshot.permissions += a.permissions.len() as u64;
                    snapshot.channels += a.channels.len() as u64;
                    snapshot.allocation_ids.push(a.id);
                }
                let _ = reply.send(snapshot);
            }
            WorkerRequest::Disconnect { target, reply } => {
                let _ = reply.send(self.disconnect(target));
            }
        }
    }

    /// Ends allocations for the operator (their records say `disconnected`) and closes the
    /// connections of their TCP/TLS clients: without an allocation they have nothing to do.
    fn disconnect(&mut self, target: DisconnectTarget) -> Vec<AllocationId> {
        let streams: HashMap<AllocationId, (SocketAddr, SocketAddr, Transport)> = self
            .server
            .allocations()
            .filter(|a| a.transport.is_stream())
            .map(|a| (a.id, (a.client, a.listener, a.transport)))
            .collect();
        let ended = match target {
            DisconnectTarget::Allocation(id) => {
                if self.server.disconnect(id) {
                    vec![id]
                } else {
                    Vec::new()
                }
            }
            DisconnectTarget::User(user) => self.server.disconnect_user(&user),
        };
        self.drain_commands(None);
        for id in &ended {
            let token = streams
                .get(id)
                .and_then(|key| self.streams.get(key))
                .copied();
            if let Some(token) = token {
                self.close_stream(token, CloseReason::Disconnected);
            }
        }
        ended
    }

    /// What the socket path relayed per allocation (both relay sockets of a dual one).
    fn socket_counters(&self) -> HashMap<AllocationId, PathCounters> {
        let mut counters: HashMap<AllocationId, PathCounters> = HashMap::new();
        for token in self.relays.values() {
            if let Some(Entry {
                role: Role::Relay { id, .. },
                counters: c,
                ..
            }) = self.sockets.get(*token)
            {
                *counters.entry(*id).or_default() += *c;
            }
        }
        counters
    }

    fn allocation_views(&self) -> Vec<AllocationView> {
        let now = Instant::now();
        let counters = self.socket_counters();
        let kernel = lock(&self.kernel);
        self.server
            .allocations()
            .map(|a| AllocationView {
                id: a.id.0,
                user: a.username,
                client: a.client.to_string(),
                listener: a.listener.to_string(),
                transport: a.transport.label().to_owned(),
                relayed: a.relayed.to_string(),
                relayed_additional: a.additional_relayed.map(|r| r.to_string()),
                expires_in_secs: a.expires.saturating_duration_since(now).as_secs(),
                started_unix: unix_now()
                    .saturating_sub(now.saturating_duration_since(a.started).as_secs()),
                peers: a.permissions.iter().map(ToString::to_string).collect(),
                channels: a
                    .channels
                    .iter()
                    .map(|(number, peer)| ChannelView {
                        number: *number,
                        peer: peer.to_string(),
                    })
                    .collect(),
                path: if kernel.enabled(a.id) && !a.transport.is_stream() {
                    "kernel"
                } else {
                    "socket"
                }
                .to_owned(),
                socket: counters.get(&a.id).copied().unwrap_or_default(),
                kernel: kernel.counters(a.id),
            })
            .collect()
    }

    /// Takes the worker's channels out of the kernel and drops every socket; returns how many
    /// relay sockets it released.
    fn close(&mut self) -> usize {
        let open = self.relays.len();
        // Allocations end before their connections close, so their records say `shutdown`;
        // their relay sockets and kernel entries go with them.
        self.server.end_all();
        self.drain_commands(None);
        self.close_streams();
        let mut kernel = lock(&self.kernel);
        for (relayed, token) in self.relays.drain() {
            if let Some(Role::Relay { id, .. }) = self.sockets.get(token).map(|e| e.role) {
                kernel.apply(&Command::DeleteAllocation { id, relayed });
            }
        }
        drop(kernel);
        self.listeners.clear();
        self.sockets = Sockets::default();
        open
    }
}

/// `header` and `data` as one new datagram (only when the header cannot go into headroom).
fn forward_copy(header: [u8; HEADROOM], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADROOM + data.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out
}

/// The listener socket that serves local address `addr` and the source address its transmits
/// must name: the socket bound on exactly `addr` (no source needed), else the wildcard socket
/// of that family and port (source `addr`'s IP). The kernel delivers in the same order: a
/// socket bound to the specific address wins over the wildcard one.
fn listener_socket(
    listeners: &HashMap<SocketAddr, u64>,
    addr: SocketAddr,
) -> Option<(u64, Option<IpAddr>)> {
    if let Some(token) = listeners.get(&addr) {
        return Some((*token, None));
    }
    let any = match addr.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    listeners
        .get(&SocketAddr::new(any, addr.port()))
        .map(|token| (*token, Some(addr.ip())))
}

/// Errors a UDP receive can report for an earlier send (ICMP); the socket itself is fine.
fn transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || error.raw_os_error() == Some(libc::EHOSTUNREACH)
        || error.raw_os_error() == Some(libc::ENETUNREACH)
}
