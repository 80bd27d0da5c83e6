//! One worker: a thread with its own single-threaded runtime, its own SO_REUSEPORT listener
//! sockets, its own sans-IO [`Server`] and the relay sockets of the allocations it created.
//!
//! The kernel spreads clients over the workers' listener sockets by address hash, so a client
//! always reaches the same worker and no protocol state is shared between workers (only the
//! quota ledger and the kernel fast path, behind short locks). Socket reader tasks only move
//! datagram batches into one queue; all protocol state lives in the worker's core loop, and
//! its fast-path map updates happen in the order its server decided them.

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex, MutexGuard},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tracing::{debug, warn};

use super::kernel_sync::KernelSync;
use crate::{
    control::{AllocationView, ChannelView, PathCounters},
    net::{
        self,
        batch::{self, Datagrams, Receiver, Transmit},
    },
};
use rand::rngs::StdRng;
use relay_proto::server::{AllocationId, Command, Forward, Server};

/// Events already queued are handled together before commands are flushed.
const MAX_EVENTS_PER_WAKE: usize = 256;

/// A batch of datagrams for the core.
#[derive(Debug)]
pub enum Event {
    /// From clients, on a listener socket.
    Client {
        /// The address the listener socket is bound to (a wildcard one says nothing about
        /// which local address each datagram was sent to; the datagrams do).
        listener: SocketAddr,
        datagrams: Datagrams,
    },
    /// From peers, on the relay socket of an allocation.
    Peer {
        relayed: SocketAddr,
        datagrams: Datagrams,
    },
}

/// The local socket a transmit leaves from. A listener is named by the address the client
/// contacted (never a wildcard); [`listener_socket`] finds the socket serving it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Local {
    Listener(SocketAddr),
    Relay(SocketAddr),
}

/// The relay socket of one allocation and the task reading it.
struct RelaySocket {
    id: AllocationId,
    socket: Arc<UdpSocket>,
    reader: JoinHandle<()>,
}

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
}

/// Locks the shared fast-path state; a panic elsewhere cannot leave it half-updated in a way
/// that matters more than stopping the relay would.
pub fn lock(kernel: &Mutex<KernelSync>) -> MutexGuard<'_, KernelSync> {
    kernel.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Worker {
    server: Server<StdRng>,
    events: mpsc::Sender<Event>,
    listeners: HashMap<SocketAddr, Arc<UdpSocket>>,
    readers: Vec<JoinHandle<()>>,
    relays: HashMap<SocketAddr, RelaySocket>,
    /// Commands taken from the server, in order, waiting to be executed.
    pending: VecDeque<Command>,
    /// Datagrams to send at the end of this wake, per local socket (flushed in batches).
    outbox: HashMap<Local, Vec<Transmit>>,
    /// Receive buffers shared by the relay sockets of this worker.
    relay_receiver: Arc<Mutex<Receiver>>,
    /// Datagrams the socket path dropped on send (full buffers, refused sends).
    send_drops: u64,
    /// What the socket path relayed per live allocation.
    socket_counters: HashMap<AllocationId, PathCounters>,
    /// Socket-path totals, including allocations that are gone (for metrics).
    socket_totals: PathCounters,
    kernel: Arc<Mutex<KernelSync>>,
}

/// Seconds since the Unix epoch (REST credential expiry is wall-clock based).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Worker {
    pub fn new(
        server: Server<StdRng>,
        events: mpsc::Sender<Event>,
        kernel: Arc<Mutex<KernelSync>>,
    ) -> Self {
        Self {
            server,
            events,
            listeners: HashMap::new(),
            readers: Vec::new(),
            relays: HashMap::new(),
            pending: VecDeque::new(),
            outbox: HashMap::new(),
            relay_receiver: Arc::new(Mutex::new(Receiver::new(RELAY_BATCH, net::MAX_DATAGRAM))),
            send_drops: 0,
            socket_counters: HashMap::new(),
            socket_totals: PathCounters::default(),
            kernel,
        }
    }

    /// Starts reading client datagrams from a bound listener socket.
    pub fn add_listener(&mut self, addr: SocketAddr, socket: Arc<UdpSocket>) {
        let reader = tokio::spawn(read_listener(
            Arc::clone(&socket),
            addr,
            self.events.clone(),
        ));
        self.readers.push(reader);
        self.listeners.insert(addr, socket);
    }

    /// Runs until `stop` turns true, then releases the worker's allocations (their kernel
    /// entries first) and relay sockets; returns how many allocations it released.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut requests: mpsc::Receiver<WorkerRequest>,
        mut stop: watch::Receiver<bool>,
    ) -> usize {
        loop {
            let deadline = self.server.poll_timeout();
            let timer = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        break;
                    }
                }
                event = events.recv() => {
                    let Some(event) = event else { break };
                    let now = Instant::now();
                    self.server.set_unix_time(unix_now());
                    self.handle(event, now);
                    for _ in 1..MAX_EVENTS_PER_WAKE {
                        match events.try_recv() {
                            Ok(event) => self.handle(event, now),
                            Err(_) => break,
                        }
                    }
                }
                () = timer => {
                    self.server.handle_timeout(Instant::now());
                    self.collect(None);
                }
                Some(request) = requests.recv() => self.request(request),
            }
            self.execute().await;
        }
        self.close()
    }

    fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Client {
                listener,
                datagrams,
            } => {
                let wildcard = listener.ip().is_unspecified();
                for (client, to, data) in datagrams.iter_with_destination() {
                    // RFC 8656 §2: the 5-tuple holds the server address the client contacted,
                    // which on a wildcard listener only the datagram itself knows.
                    let local = match to {
                        _ if !wildcard => listener,
                        Some(ip) => SocketAddr::new(ip, listener.port()),
                        None => {
                            debug!(%client, %listener, "no destination address; datagram dropped");
                            continue;
                        }
                    };
                    let forward = self.server.handle_client_datagram(client, local, data, now);
                    self.collect(None);
                    if let Some(forward) = forward {
                        self.relay(&forward, data, None);
                    }
                }
            }
            Event::Peer { relayed, datagrams } => {
                for (peer, data) in datagrams.iter() {
                    let forward = self.server.handle_peer_datagram(relayed, peer, data, now);
                    self.collect(Some(relayed));
                    if let Some(forward) = forward {
                        self.relay(&forward, data, Some(relayed));
                    }
                }
            }
        }
    }

    /// Queues a relayed datagram the core decided about, counted like the commands.
    fn relay(&mut self, forward: &Forward, data: &[u8], from_relay: Option<SocketAddr>) {
        let payload = forward.to_vec(data);
        let command = match *forward {
            Forward::ToPeer { relayed, peer, .. } => Command::SendToPeer {
                relayed,
                peer,
                payload,
            },
            Forward::ToClient {
                listener, client, ..
            } => Command::SendToClient {
                listener,
                client,
                payload,
            },
        };
        self.count(&command, from_relay);
        self.pending.push_back(command);
    }

    /// Moves the server's commands into `pending`, counting relayed data on the socket path:
    /// every SendToPeer is client data, and a SendToClient caused by a datagram on a relay
    /// socket is peer data (responses to requests are never caused by one).
    fn collect(&mut self, from_relay: Option<SocketAddr>) {
        while let Some(command) = self.server.next_command() {
            self.count(&command, from_relay);
            self.pending.push_back(command);
        }
    }

    fn count(&mut self, command: &Command, from_relay: Option<SocketAddr>) {
        {
            let counted = match command {
                Command::SendToPeer {
                    relayed, payload, ..
                } => Some((*relayed, payload.len(), true)),
                Command::SendToClient { payload, .. } => {
                    from_relay.map(|relayed| (relayed, payload.len(), false))
                }
                _ => None,
            };
            if let Some((relayed, len, to_peer)) = counted {
                if let Some(relay) = self.relays.get(&relayed) {
                    let one = PathCounters::one(to_peer, len);
                    *self.socket_counters.entry(relay.id).or_default() += one;
                    self.socket_totals += one;
                }
            }
        }
    }

    /// Executes every pending command (binding a relay socket may make the server emit more),
    /// then flushes the datagrams queued per socket in batches.
    async fn execute(&mut self) {
        while let Some(command) = self.pending.pop_front() {
            match command {
                Command::SendToClient {
                    listener,
                    client,
                    payload,
                } => self
                    .outbox
                    .entry(Local::Listener(listener))
                    .or_default()
                    .push(Transmit {
                        to: client,
                        src: None,
                        payload,
                    }),
                Command::SendToPeer {
                    relayed,
                    peer,
                    payload,
                } => self
                    .outbox
                    .entry(Local::Relay(relayed))
                    .or_default()
                    .push(Transmit {
                        to: peer,
                        src: None,
                        payload,
                    }),
                Command::CreateAllocation { id, relayed } => {
                    self.open_relay(id, relayed);
                    self.collect(None);
                }
                Command::DeleteAllocation { id, relayed } => {
                    lock(&self.kernel).apply(&command);
                    self.close_relay(id, relayed);
                }
                // Installed before the ChannelBind success queued behind it is sent.
                Command::CreateChannelBinding { .. }
                | Command::DeleteChannelBinding { .. }
                | Command::CreatePermission { .. }
                | Command::DeletePermission { .. } => lock(&self.kernel).apply(&command),
            }
        }
        self.flush().await;
    }

    async fn flush(&mut self) {
        for (local, queue) in self.outbox.iter_mut() {
            if queue.is_empty() {
                continue;
            }
            let socket = match local {
                Local::Listener(addr) => {
                    listener_socket(&self.listeners, *addr).map(|(socket, src)| {
                        // A wildcard socket must be told the source, or the route picks one.
                        if src.is_some() {
                            queue.iter_mut().for_each(|t| t.src = src);
                        }
                        socket
                    })
                }
                Local::Relay(addr) => self.relays.get(addr).map(|r| &r.socket),
            };
            match socket {
                Some(socket) => self.send_drops += batch::send_all(socket, queue).await as u64,
                None => {
                    debug!(
                        ?local,
                        dropped = queue.len(),
                        "socket closed before sending"
                    );
                    queue.clear();
                }
            }
        }
        // Keep the queues of live sockets (their capacity is reused), forget closed ones.
        let (listeners, relays) = (&self.listeners, &self.relays);
        self.outbox.retain(|local, _| match local {
            Local::Listener(addr) => listener_socket(listeners, *addr).is_some(),
            Local::Relay(addr) => relays.contains_key(addr),
        });
    }

    /// Binds the relay socket of a new allocation and tells the server how it went
    /// (RFC 8656 §7.2: the Allocate success is only sent once the address is really ours).
    fn open_relay(&mut self, id: AllocationId, relayed: SocketAddr) {
        let now = Instant::now();
        match net::bind_udp(relayed) {
            Ok(socket) => {
                let socket = Arc::new(socket);
                let reader = tokio::spawn(read_relay(
                    Arc::clone(&socket),
                    relayed,
                    Arc::clone(&self.relay_receiver),
                    self.events.clone(),
                ));
                self.relays
                    .insert(relayed, RelaySocket { id, socket, reader });
                debug!(allocation = %id, %relayed, "relay socket bound");
                self.server.allocation_bound(id, now);
            }
            Err(error) => {
                debug!(allocation = %id, %relayed, %error, "relay port unavailable");
                self.server.allocation_bind_failed(id, now);
            }
        }
    }

    fn close_relay(&mut self, id: AllocationId, relayed: SocketAddr) {
        self.socket_counters.remove(&id);
        match self.relays.remove(&relayed) {
            Some(relay) if relay.id == id => {
                relay.reader.abort();
                debug!(allocation = %id, %relayed, "relay socket closed");
            }
            Some(other) => {
                warn!(allocation = %id, %relayed, "relay socket belongs to another allocation");
                self.relays.insert(relayed, other);
            }
            None => {}
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
                let result = if self.server.allocations().any(|a| a.id == allocation) {
                    lock(&self.kernel).set_allocation(allocation, on)
                } else {
                    Err(format!("no allocation {allocation}"))
                };
                let _ = reply.send(result);
            }
            WorkerRequest::Snapshot(reply) => {
                let mut snapshot = WorkerSnapshot {
                    socket_totals: self.socket_totals,
                    send_drops: self.send_drops,
                    ..WorkerSnapshot::default()
                };
                for a in self.server.allocations() {
                    snapshot.allocations += 1;
                    snapshot.permissions += a.permissions.len() as u64;
                    snapshot.channels += a.channels.len() as u64;
                    snapshot.allocation_ids.push(a.id);
                }
                let _ = reply.send(snapshot);
            }
        }
    }

    fn allocation_views(&self) -> Vec<AllocationView> {
        let now = Instant::now();
        let kernel = lock(&self.kernel);
        self.server
            .allocations()
            .map(|a| AllocationView {
                id: a.id.0,
                user: a.username,
                client: a.client.to_string(),
                listener: a.listener.to_string(),
                relayed: a.relayed.to_string(),
                relayed_additional: a.additional_relayed.map(|r| r.to_string()),
                expires_in_secs: a.expires.saturating_duration_since(now).as_secs(),
                peers: a.permissions.iter().map(ToString::to_string).collect(),
                channels: a
                    .channels
                    .iter()
                    .map(|(number, peer)| ChannelView {
                        number: *number,
                        peer: peer.to_string(),
                    })
                    .collect(),
                path: if kernel.enabled(a.id) {
                    "kernel"
                } else {
                    "socket"
                }
                .to_owned(),
                socket: self.socket_counters.get(&a.id).copied().unwrap_or_default(),
                kernel: kernel.counters(a.id),
            })
            .collect()
    }

    /// Stops every reader, takes the worker's channels out of the kernel and drops every
    /// socket; returns how many relay sockets it released.
    fn close(&mut self) -> usize {
        for reader in self.readers.drain(..) {
            reader.abort();
        }
        let open = self.relays.len();
        let mut kernel = lock(&self.kernel);
        for (relayed, relay) in self.relays.drain() {
            kernel.apply(&Command::DeleteAllocation {
                id: relay.id,
                relayed,
            });
            relay.reader.abort();
        }
        open
    }
}

/// The listener socket that serves local address `addr` and the source address its transmits
/// must name: the socket bound on exactly `addr` (no source needed), else the wildcard socket
/// of that family and port (source `addr`'s IP). The kernel delivers in the same order: a
/// socket bound to the specific address wins over the wildcard one.
fn listener_socket(
    listeners: &HashMap<SocketAddr, Arc<UdpSocket>>,
    addr: SocketAddr,
) -> Option<(&Arc<UdpSocket>, Option<IpAddr>)> {
    if let Some(socket) = listeners.get(&addr) {
        return Some((socket, None));
    }
    let any = match addr.ip() {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    listeners
        .get(&SocketAddr::new(any, addr.port()))
        .map(|socket| (socket, Some(addr.ip())))
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

/// Slot size for listener sockets: any client datagram fits.
const LISTENER_SLOT: usize = net::MAX_DATAGRAM;
/// Relay sockets take fewer datagrams per batch; their receive buffers are shared by all
/// relay sockets of a worker, so memory does not grow with the number of allocations.
const RELAY_BATCH: usize = 8;

/// Reads datagram batches from `socket` (bound on `local`) into the worker's queue until the
/// worker goes away or the socket fails; `event` wraps a batch for the queue. The receive
/// buffers may be shared with other sockets of this worker's thread: the lock is only held
/// for one non-blocking `recvmmsg`.
async fn read_socket(
    socket: Arc<UdpSocket>,
    local: SocketAddr,
    receiver: Arc<Mutex<Receiver>>,
    events: mpsc::Sender<Event>,
    event: fn(SocketAddr, Datagrams) -> Event,
) {
    loop {
        if let Err(error) = socket.readable().await {
            warn!(%local, %error, "socket failed; stopped reading it");
            return;
        }
        let mut datagrams = Datagrams::default();
        let result = receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_recv(&socket, &mut datagrams);
        match result {
            Ok(()) => {
                if events.send(event(local, datagrams)).await.is_err() {
                    return;
                }
            }
            Err(error) if transient(&error) => {}
            Err(error) => {
                warn!(%local, %error, "receive failed; socket stopped");
                return;
            }
        }
    }
}

async fn read_listener(socket: Arc<UdpSocket>, listener: SocketAddr, events: mpsc::Sender<Event>) {
    let receiver = Arc::new(Mutex::new(Receiver::new(batch::RECV_BATCH, LISTENER_SLOT)));
    let event = |listener, datagrams| Event::Client {
        listener,
        datagrams,
    };
    read_socket(socket, listener, receiver, events, event).await
}

async fn read_relay(
    socket: Arc<UdpSocket>,
    relayed: SocketAddr,
    receiver: Arc<Mutex<Receiver>>,
    events: mpsc::Sender<Event>,
) {
    let event = |relayed, datagrams| Event::Peer { relayed, datagrams };
    read_socket(socket, relayed, receiver, events, event).await
}
