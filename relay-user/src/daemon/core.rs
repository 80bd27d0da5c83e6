//! The daemon's core task: owns the sans-IO [`Server`], feeds it datagrams and time, and
//! executes the commands it emits (send, open/close relay sockets, fast-path updates).
//!
//! Socket reader tasks only move datagrams into one queue; all protocol state lives in this one
//! task, so no locks guard it and fast-path map updates happen in the order the core decided
//! them.

use std::{
    collections::{HashMap, VecDeque},
    fmt::Write as _,
    future::Future,
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use tokio::{net::UdpSocket, sync::mpsc, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{
    control::{AdminRequest, AllocationList, AllocationView, ChannelView, PathCounters},
    fastpath::FastPath,
    net::{
        self,
        batch::{self, Datagrams, Receiver, Transmit},
    },
    proto::server::{AllocationId, Command, Server},
};

/// Events already queued are handled together before commands are flushed.
const MAX_EVENTS_PER_WAKE: usize = 256;

/// A batch of datagrams for the core.
#[derive(Debug)]
pub enum Event {
    /// From clients, on a listener socket.
    Client {
        listener: SocketAddr,
        datagrams: Datagrams,
    },
    /// From peers, on the relay socket of an allocation.
    Peer {
        relayed: SocketAddr,
        datagrams: Datagrams,
    },
}

/// The local socket a transmit leaves from.
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

pub struct Core {
    server: Server,
    events: mpsc::Sender<Event>,
    listeners: HashMap<SocketAddr, Arc<UdpSocket>>,
    readers: Vec<JoinHandle<()>>,
    relays: HashMap<SocketAddr, RelaySocket>,
    /// Commands taken from the server, in order, waiting to be executed.
    pending: VecDeque<Command>,
    /// Datagrams to send at the end of this wake, per local socket (flushed in batches).
    outbox: HashMap<Local, Vec<Transmit>>,
    /// What the socket path relayed per live allocation.
    socket_counters: HashMap<AllocationId, PathCounters>,
    /// Socket-path totals, including allocations that are gone (for metrics).
    socket_totals: PathCounters,
    fastpath: Option<FastPath>,
}

/// Seconds since the Unix epoch (REST credential expiry is wall-clock based).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Core {
    pub fn new(server: Server, events: mpsc::Sender<Event>, fastpath: Option<FastPath>) -> Self {
        Self {
            server,
            events,
            listeners: HashMap::new(),
            readers: Vec::new(),
            relays: HashMap::new(),
            pending: VecDeque::new(),
            outbox: HashMap::new(),
            socket_counters: HashMap::new(),
            socket_totals: PathCounters::default(),
            fastpath,
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

    /// Runs until `shutdown` resolves (or every event source is gone), then releases every
    /// relay socket and the fast path.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut admin: mpsc::Receiver<AdminRequest>,
        shutdown: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let result = loop {
            let deadline = self.server.poll_timeout();
            let timer = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = &mut shutdown => break result,
                event = events.recv() => {
                    let Some(event) = event else { break Ok(()) };
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
                Some(request) = admin.recv() => self.admin(request),
            }
            self.execute().await;
        };
        self.close();
        result
    }

    fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Client {
                listener,
                datagrams,
            } => {
                for (client, data) in datagrams.iter() {
                    self.server
                        .handle_client_datagram(client, listener, data, now);
                    self.collect(None);
                }
            }
            Event::Peer { relayed, datagrams } => {
                for (peer, data) in datagrams.iter() {
                    self.server.handle_peer_datagram(relayed, peer, data, now);
                    self.collect(Some(relayed));
                }
            }
        }
    }

    /// Moves the server's commands into `pending`, counting relayed data on the socket path:
    /// every SendToPeer is client data, and a SendToClient caused by a datagram on a relay
    /// socket is peer data (responses to requests are never caused by one).
    fn collect(&mut self, from_relay: Option<SocketAddr>) {
        while let Some(command) = self.server.next_command() {
            let counted = match &command {
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
                    let counters = self.socket_counters.entry(relay.id).or_default();
                    for c in [counters, &mut self.socket_totals] {
                        if to_peer {
                            c.to_peer_packets += 1;
                            c.to_peer_bytes += len as u64;
                        } else {
                            c.to_client_packets += 1;
                            c.to_client_bytes += len as u64;
                        }
                    }
                }
            }
            self.pending.push_back(command);
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
                    .push(Transmit { to: peer, payload }),
                Command::CreateAllocation { id, relayed } => {
                    self.open_relay(id, relayed);
                    self.collect(None);
                }
                Command::DeleteAllocation { id, relayed } => self.close_relay(id, relayed),
                // The kernel program attached today only counts verdicts; it forwards nothing,
                // so there is no channel state to install in it.
                Command::CreateChannelBinding { .. } | Command::DeleteChannelBinding { .. } => {}
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
                Local::Listener(addr) => self.listeners.get(addr),
                Local::Relay(addr) => self.relays.get(addr).map(|r| &r.socket),
            };
            match socket {
                Some(socket) => batch::send_all(socket, queue).await,
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
            Local::Listener(addr) => listeners.contains_key(addr),
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

    fn admin(&mut self, request: AdminRequest) {
        match request {
            AdminRequest::List(reply) => {
                let _ = reply.send(self.allocation_list());
            }
            AdminRequest::SetFastPath { reply, .. } | AdminRequest::SetDefault { reply, .. } => {
                let _ = reply.send(Err(
                    "the kernel fast path is not running (relay serve --fastpath off)".to_owned(),
                ));
            }
            AdminRequest::Metrics(reply) => {
                let _ = reply.send(self.metrics());
            }
        }
    }

    fn allocation_list(&self) -> AllocationList {
        let now = Instant::now();
        let allocations = self
            .server
            .allocations()
            .map(|a| AllocationView {
                id: a.id.0,
                user: a.username,
                client: a.client.to_string(),
                listener: a.listener.to_string(),
                relayed: a.relayed.to_string(),
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
                path: "socket".to_owned(),
                socket: self.socket_counters.get(&a.id).copied().unwrap_or_default(),
                kernel: PathCounters::default(),
            })
            .collect();
        AllocationList {
            fastpath_attached: self.fastpath.is_some(),
            fastpath_default: false,
            allocations,
        }
    }

    /// Prometheus text exposition; no per-user labels.
    fn metrics(&self) -> String {
        let (mut allocations, mut permissions, mut channels) = (0u64, 0u64, 0u64);
        for a in self.server.allocations() {
            allocations += 1;
            permissions += a.permissions.len() as u64;
            channels += a.channels.len() as u64;
        }
        let mut out = String::new();
        for (name, help, value) in [
            ("relay_allocations", "Live allocations.", allocations),
            ("relay_permissions", "Live permissions.", permissions),
            ("relay_channels", "Bound channels.", channels),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP relay_relayed_packets_total Datagrams relayed, by path and direction.\n\
             # TYPE relay_relayed_packets_total counter"
        );
        let t = self.socket_totals;
        for (direction, packets) in [
            ("to_peer", t.to_peer_packets),
            ("to_client", t.to_client_packets),
        ] {
            let _ = writeln!(
                out,
                "relay_relayed_packets_total{{path=\"socket\",direction=\"{direction}\"}} {packets}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP relay_relayed_bytes_total Payload bytes relayed, by path and direction.\n\
             # TYPE relay_relayed_bytes_total counter"
        );
        for (direction, bytes) in [
            ("to_peer", t.to_peer_bytes),
            ("to_client", t.to_client_bytes),
        ] {
            let _ = writeln!(
                out,
                "relay_relayed_bytes_total{{path=\"socket\",direction=\"{direction}\"}} {bytes}"
            );
        }
        if let Some(fastpath) = &self.fastpath {
            if let Ok(counters) = fastpath.verdict_counters() {
                let _ = writeln!(
                    out,
                    "# HELP relay_fastpath_verdicts_total Kernel program verdicts, by reason.\n\
                     # TYPE relay_fastpath_verdicts_total counter"
                );
                for (reason, n) in counters {
                    let _ = writeln!(
                        out,
                        "relay_fastpath_verdicts_total{{reason=\"{}\"}} {n}",
                        reason.label()
                    );
                }
            }
        }
        out
    }

    /// Stops every reader and drops every socket; the fast path detaches when dropped.
    fn close(&mut self) {
        for reader in self.readers.drain(..) {
            reader.abort();
        }
        let open = self.relays.len();
        for (_, relay) in self.relays.drain() {
            relay.reader.abort();
        }
        info!(released = open, "relay sockets released");
        if let Some(fastpath) = self.fastpath.take() {
            report_verdicts(&fastpath);
        }
    }
}

fn report_verdicts(fastpath: &FastPath) {
    match fastpath.verdict_counters() {
        Ok(counters) => {
            let summary: Vec<String> = counters
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(reason, n)| format!("{}={n}", reason.label()))
                .collect();
            info!("fast path verdicts: {}", summary.join(" "));
        }
        Err(error) => warn!("cannot read fast path counters: {error}"),
    }
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
/// Relay sockets take fewer datagrams per batch: there is one per allocation.
const RELAY_BATCH: usize = 8;

async fn read_listener(socket: Arc<UdpSocket>, listener: SocketAddr, events: mpsc::Sender<Event>) {
    let mut receiver = Receiver::new(batch::RECV_BATCH, LISTENER_SLOT);
    loop {
        let mut datagrams = Datagrams::default();
        match receiver.recv(&socket, &mut datagrams).await {
            Ok(()) => {
                let event = Event::Client {
                    listener,
                    datagrams,
                };
                if events.send(event).await.is_err() {
                    return;
                }
            }
            Err(error) if transient(&error) => {}
            Err(error) => {
                warn!(%listener, %error, "listener receive failed; listener stopped");
                return;
            }
        }
    }
}

async fn read_relay(socket: Arc<UdpSocket>, relayed: SocketAddr, events: mpsc::Sender<Event>) {
    let mut receiver = Receiver::new(RELAY_BATCH, net::MAX_DATAGRAM);
    loop {
        let mut datagrams = Datagrams::default();
        match receiver.recv(&socket, &mut datagrams).await {
            Ok(()) => {
                let event = Event::Peer { relayed, datagrams };
                if events.send(event).await.is_err() {
                    return;
                }
            }
            Err(error) if transient(&error) => {}
            Err(error) => {
                warn!(%relayed, %error, "relay socket receive failed; socket stopped");
                return;
            }
        }
    }
}
