//! Sans-IO TURN server core (RFC 8656 over UDP, long-term credentials of RFC 8489 §9.2).
//!
//! The daemon feeds datagrams and time in and drains [`Command`]s out; relayed data (ChannelData
//! both ways) comes back as a [`Forward`] decision about the caller's own buffer instead of a
//! copy (see [`forward`]); expiry runs from a deadline heap (see [`timers`]). The core never reads a
//! clock, never touches a socket and takes its randomness (ports, nonce secret, Data indication
//! transaction ids) from the injected RNG.

mod allocation;
mod bandwidth;
mod drain;
mod effects;
mod forward;
mod quota;
mod relayed;
mod reload;
mod request;
#[cfg(test)]
mod tests;
mod timers;
mod usage;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{CryptoRng, Rng, RngCore};

use crate::auth::{Credentials, LongTermKey, NonceCheck, NonceIssuer};
use crate::channel_data::{
    classify, ChannelData, PacketKind, CHANNEL_DATA_HEADER_LEN, CHANNEL_RANGE,
};
use crate::limiter::UnauthLimiter;
use crate::Transport;

use crate::policy::PeerPolicy;
use crate::stun::{
    AddressFamily, Attribute, Class, DecodeError, Integrity, Message, MessageBuilder, Method,
    StunErrorCode, TransactionId,
};

use allocation::{AllocState, Allocation, Channel, Pending, Slot};
pub use bandwidth::{
    BandwidthKey, BandwidthLedger, Direction, UserBandwidth, UserUsage, BANDWIDTH_SHARDS,
};
use drain::Refusal;
pub use drain::{Alternates, DrainState, DRAINING_REASON};
use effects::Effects;
pub use forward::Forward;
pub use quota::{AllocationQuota, QuotaError, QuotaLedger};
pub use relayed::LiveRelayed;
pub use reload::{Reconfigure, ReconfigureReport};
use request::{
    AllocateRequest, ChannelBindRequest, CreatePermissionRequest, RefreshRequest, Rejection,
    SendIndication,
};
use timers::Timers;
pub use usage::{AllocationEnd, EndReason};

/// After expiry a channel number and its peer stay reserved this long (RFC 8656 §12).
const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);
/// Relay sockets asked for per Allocate before giving up with 508.
const MAX_BIND_ATTEMPTS: u32 = 4;
/// Random port picks before scanning the range.
const RANDOM_PORT_TRIES: u32 = 16;

/// Server configuration.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// REALM sent in 401/438 (must match the realm `credentials` derive keys with).
    pub realm: String,
    /// SOFTWARE attribute for responses, if any.
    pub software: Option<String>,
    /// Relay addresses, any number per family: new allocations of a family take them in turn
    /// (so a host is not capped at one port range's worth of allocations).
    pub relay_ips: Vec<IpAddr>,
    /// Relay port range.
    pub port_range: RangeInclusive<u16>,
    /// Long-term and REST credentials.
    pub credentials: Credentials,
    /// Peer address policy.
    pub policy: PeerPolicy,
    /// Allocation lifetime without (or below) a requested LIFETIME.
    pub default_lifetime: Duration,
    /// Largest allocation lifetime granted.
    pub max_lifetime: Duration,
    /// Permission lifetime (RFC 8656 §9: 300 s).
    pub permission_lifetime: Duration,
    /// Channel binding lifetime (RFC 8656 §12: 600 s).
    pub channel_lifetime: Duration,
    /// How long a nonce stays valid before 438.
    pub nonce_lifetime: Duration,
    /// Total allocations (508 above).
    pub max_allocations: usize,
    /// Allocations per username (486 above).
    pub max_allocations_per_user: usize,
    /// Permissions per allocation (508 above).
    pub max_permissions_per_allocation: usize,
    /// Channels (bound or in their reserved period) per allocation (508 above).
    pub max_channels_per_allocation: usize,
    /// The byte budget of answers to unauthenticated requests per source, shared with the
    /// other workers' servers (relay-wide).
    pub unauth_limiter: Arc<UnauthLimiter>,
    /// Allocation counts shared with the other workers' servers (caps are relay-wide); the core
    /// only takes and gives back through the trait.
    pub quota: Arc<dyn AllocationQuota>,
    /// Per-user bandwidth budget shared with the other workers' servers; `None` (the
    /// default) is no limit and costs the relayed datagrams nothing.
    pub bandwidth: Option<Arc<dyn UserBandwidth>>,
    /// Id of the first allocation; with `allocation_id_stride` this keeps ids unique across
    /// workers (worker i of n: first i + 1, stride n).
    pub first_allocation_id: u64,
    /// Step between allocation ids.
    pub allocation_id_stride: u64,
    /// Channel numbers ChannelBind accepts: RFC 8656's 0x4000-0x4FFF by default, or RFC 5766's
    /// 0x4000-0x7FFF for older clients.
    pub channel_range: RangeInclusive<u16>,
    /// Relayed addresses of every live allocation, shared with the other workers' servers:
    /// the only ports of a relay address a client may send to (client-to-client).
    pub live_relayed: Arc<LiveRelayed>,
    /// Whether the relay is draining (no new allocations), shared with the other workers'
    /// servers so one drain covers the whole relay.
    pub drain: Arc<DrainState>,
    /// Where refused Allocates are sent (300 Try Alternate) while draining or at the
    /// allocation cap.
    pub alternates: Alternates,
    /// Relay-wide allocations from which new Allocates go to an alternate (300) when one of
    /// the client's family is configured (a load threshold below `max_allocations`).
    pub redirect_above: Option<usize>,
}

impl ServerConfig {
    /// A configuration with the RFC default lifetimes and conservative caps.
    pub fn new(
        realm: impl Into<String>,
        relay_ips: Vec<IpAddr>,
        credentials: Credentials,
        policy: PeerPolicy,
    ) -> Self {
        Self {
            realm: realm.into(),
            software: None,
            relay_ips,
            port_range: 49152..=65535,
            credentials,
            policy,
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            permission_lifetime: Duration::from_secs(300),
            channel_lifetime: Duration::from_secs(600),
            nonce_lifetime: Duration::from_secs(3600),
            max_allocations: 16_384,
            max_allocations_per_user: 64,
            max_permissions_per_allocation: 128,
            max_channels_per_allocation: 16,
            unauth_limiter: Arc::new(UnauthLimiter::default()),
            channel_range: CHANNEL_RANGE,
            quota: Arc::new(QuotaLedger::default()),
            bandwidth: None,
            first_allocation_id: 1,
            allocation_id_stride: 1,
            live_relayed: Arc::new(LiveRelayed::default()),
            drain: Arc::new(DrainState::default()),
            alternates: Alternates::default(),
            redirect_above: None,
        }
    }
}

/// Identifies an allocation across commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocationId(pub u64);

impl fmt::Display for AllocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Effects for the IO layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Send `payload` to the client from the listener address.
    SendToClient {
        /// listener (local) address
        listener: SocketAddr,
        /// client address
        client: SocketAddr,
        /// the client's transport: a datagram, or a message on its connection
        transport: Transport,
        /// datagram
        payload: Vec<u8>,
    },
    /// Send `payload` to the peer from the relayed address.
    SendToPeer {
        /// relayed (local) address
        relayed: SocketAddr,
        /// peer address
        peer: SocketAddr,
        /// datagram
        payload: Vec<u8>,
    },
    /// Bind a UDP socket on exactly `relayed`; answer with [`Server::allocation_bound`] or
    /// [`Server::allocation_bind_failed`]. The core holds the Allocate response until then;
    /// after a failure it asks for another port a few times, then answers 508. A dual
    /// allocation (RFC 8656 §7.2 ADDITIONAL-ADDRESS-FAMILY) asks for its IPv6 socket with a
    /// second CreateAllocation of the same id once the IPv4 one is bound; at most one is
    /// outstanding per allocation.
    CreateAllocation {
        /// allocation
        id: AllocationId,
        /// address to bind
        relayed: SocketAddr,
    },
    /// Close one relay socket of an allocation (a dual allocation has two, each closed by a
    /// command of its own).
    DeleteAllocation {
        /// allocation
        id: AllocationId,
        /// the relayed address whose socket closes
        relayed: SocketAddr,
    },
    /// Install (or refresh) a channel in the kernel fast path; emitted on ChannelBind success
    /// and every refresh.
    CreateChannelBinding {
        /// allocation
        id: AllocationId,
        /// client address
        client: SocketAddr,
        /// listener address
        listener: SocketAddr,
        /// the client's transport (the kernel forwards only UDP clients)
        transport: Transport,
        /// relayed address
        relayed: SocketAddr,
        /// peer address
        peer: SocketAddr,
        /// channel number
        channel: u16,
        /// when the binding stops being valid
        expires_at: Instant,
    },
    /// Remove a channel from the kernel fast path.
    DeleteChannelBinding {
        /// allocation
        id: AllocationId,
        /// client address
        client: SocketAddr,
        /// listener address
        listener: SocketAddr,
        /// the client's transport
        transport: Transport,
        /// relayed address
        relayed: SocketAddr,
        /// peer address
        peer: SocketAddr,
        /// channel number
        channel: u16,
    },
    /// Install (or refresh) a permission in the kernel fast path (RFC 8656 §9), so Send
    /// indications to `peer_ip` and a peer's datagrams without a channel can be forwarded
    /// there; emitted when a permission is installed or refreshed and when the allocation is
    /// refreshed.
    CreatePermission {
        /// allocation
        id: AllocationId,
        /// client address
        client: SocketAddr,
        /// listener address
        listener: SocketAddr,
        /// the client's transport (the kernel forwards only UDP clients)
        transport: Transport,
        /// relayed address
        relayed: SocketAddr,
        /// the permitted peer IP
        peer_ip: IpAddr,
        /// when the permission (or the allocation, if earlier) ends
        expires_at: Instant,
    },
    /// Remove a permission from the kernel fast path (it expired).
    DeletePermission {
        /// allocation
        id: AllocationId,
        /// relayed address
        relayed: SocketAddr,
        /// the peer IP
        peer_ip: IpAddr,
    },
}

/// Snapshot of one (bound) allocation for admin and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocationInfo {
    /// allocation id
    pub id: AllocationId,
    /// username that created it
    pub username: String,
    /// client transport address
    pub client: SocketAddr,
    /// listener (server) transport address
    pub listener: SocketAddr,
    /// the client's transport
    pub transport: Transport,
    /// relayed transport address (of the requested family; IPv4 in a dual allocation)
    pub relayed: SocketAddr,
    /// the IPv6 relayed transport address of a dual allocation
    pub additional_relayed: Option<SocketAddr>,
    /// expiry
    pub expires: Instant,
    /// when it went live
    pub started: Instant,
    /// peer IPs with a live permission
    pub permissions: Vec<IpAddr>,
    /// bound channels: (number, peer)
    pub channels: Vec<(u16, SocketAddr)>,
}

/// Where and how to answer one request.
#[derive(Clone, Debug)]
struct Ctx {
    client: SocketAddr,
    listener: SocketAddr,
    transport: Transport,
    method: Method,
    tid: TransactionId,
    fingerprint: bool,
    auth: Option<Auth>,
}

/// The credentials a request was authenticated with.
#[derive(Clone, Debug)]
struct Auth {
    username: String,
    key: LongTermKey,
    sha256: bool,
}

/// The TURN server state machine.
///
/// `R` is the injected randomness (the daemon passes an entropy-seeded `StdRng`, tests a seeded
/// one). It must be a CSPRNG: it keys the nonces' HMAC and picks relayed ports and Data
/// indication transaction ids, all of which an attacker must not predict.
#[derive(Debug)]
pub struct Server<R> {
    config: ServerConfig,
    relay_v4: Vec<IpAddr>,
    relay_v6: Vec<IpAddr>,
    /// Relayed addresses in use (or being bound) per relay IP: a new allocation goes to the
    /// least used IP of its family.
    relayed_per_ip: HashMap<IpAddr, usize>,
    /// Breaks ties between equally used relay IPs, in turn.
    next_relay_ip: usize,
    rng: R,
    unix_now: u64,
    nonces: NonceIssuer,
    next_id: u64,
    /// Hashed, not ordered: the per-datagram lookups cost the same with 1 or 10,000 entries.
    allocations: HashMap<AllocationId, Allocation>,
    /// (client, listener, transport) → allocation: the 5-tuple (RFC 8656 §2).
    by_five_tuple: HashMap<(SocketAddr, SocketAddr, Transport), AllocationId>,
    /// relayed address (also while its socket is being bound) → allocation
    by_relayed: HashMap<SocketAddr, AllocationId>,
    /// Commands for the IO layer, and the channel routes they installed.
    commands: Effects,
    /// Expiry deadlines of the allocations and what they hold.
    timers: Timers,
    /// Error responses sent, by method and code (for metrics; no per-user keys).
    error_responses: HashMap<(Method, StunErrorCode), u64>,
    /// Live allocations that ended since the IO layer last asked (see [`Server::next_ended`]).
    ended: VecDeque<AllocationEnd>,
}

/// [`Server::peer_reachable`] on the configuration alone, so it can be lent while an
/// allocation is borrowed.
fn reachable(config: &ServerConfig, peer: SocketAddr) -> bool {
    let own = config.relay_ips.contains(&peer.ip().to_canonical())
        || config.policy.reaches_host(peer.ip());
    !own || config.live_relayed.contains(peer)
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

impl<R: RngCore + CryptoRng> Server<R> {
    /// Creates the server; `now` is the epoch of its nonces, `unix_now` the wall clock for
    /// REST credential expiry.
    pub fn new(config: ServerConfig, mut rng: R, now: Instant, unix_now: u64) -> Self {
        let relay_v4 = config
            .relay_ips
            .iter()
            .copied()
            .filter(IpAddr::is_ipv4)
            .collect();
        let relay_v6 = config
            .relay_ips
            .iter()
            .copied()
            .filter(IpAddr::is_ipv6)
            .collect();
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        let nonces = NonceIssuer::new(secret, config.nonce_lifetime, now);
        Self {
            relay_v4,
            relay_v6,
            relayed_per_ip: HashMap::new(),
            next_relay_ip: 0,
            rng,
            unix_now,
            nonces,
            next_id: config.first_allocation_id.max(1),
            allocations: HashMap::new(),
            by_five_tuple: HashMap::new(),
            by_relayed: HashMap::new(),
            commands: Effects::default(),
            timers: Timers::default(),
            error_responses: HashMap::new(),
            ended: VecDeque::new(),
            config,
        }
    }

    /// Updates the wall clock used for REST credential expiry.
    pub fn set_unix_time(&mut self, unix_now: u64) {
        self.unix_now = unix_now;
    }

    /// Next effect for the IO layer.
    pub fn next_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// Snapshot of the bound allocations, by id.
    pub fn allocations(&self) -> impl Iterator<Item = AllocationInfo> + '_ {
        let mut active: Vec<&Allocation> = self
            .allocations
            .values()
            .filter(|a| matches!(a.state, AllocState::Active))
            .collect();
        active.sort_unstable_by_key(|a| a.id);
        active.into_iter().map(|a| AllocationInfo {
            id: a.id,
            username: a.username.clone(),
            client: a.client,
            listener: a.listener,
            transport: a.transport,
            relayed: a.relayed,
            additional_relayed: a.additional,
            expires: a.expires,
            started: a.started,
            permissions: a.permissions.keys().copied().collect(),
            channels: a
                .channels
                .iter()
                .filter(|(_, c)| c.bound)
                .map(|(n, c)| (*n, c.peer))
                .collect(),
        })
    }

    /// Earliest deadline at which [`Server::handle_timeout`] has work; O(1) apart from
    /// dropping heap entries that later scheduling replaced (each dropped once, O(log n)).
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        loop {
            let (at, id) = self.timers.earliest()?;
            let live = self
                .allocations
                .get(&id)
                .is_some_and(|a| a.scheduled == Some(at));
            if live {
                return Some(at);
            }
            self.timers.pop();
        }
    }

    /// Expires allocations, permissions and channels (RFC 8656 §7, §9, §12). Nonces are
    /// stateless (their age is inside them), so nothing is kept for them. Only allocations
    /// with something due are visited (O(log n) each), however many there are.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((at, id)) = self.timers.pop_due(now) {
            let Some(alloc) = self.allocations.get_mut(&id) else {
                continue;
            };
            // An entry that later scheduling replaced.
            if alloc.scheduled != Some(at) {
                continue;
            }
            alloc.scheduled = None;
            if alloc.expires <= now {
                self.remove_allocation(id, EndReason::Expired);
                continue;
            }
            alloc.expire(now, &mut self.commands);
            self.schedule(id);
        }
    }

    /// Makes the heap's live entry for allocation `id` its next deadline; called after
    /// anything that may have moved it. The entry it replaces stays in the heap, stale, until
    /// it comes to the top.
    fn schedule(&mut self, id: AllocationId) {
        let Some(alloc) = self.allocations.get_mut(&id) else {
            return;
        };
        let next = alloc.next_deadline();
        if alloc.scheduled != next {
            alloc.scheduled = next;
            if let Some(at) = next {
                self.timers.push(at, id);
            }
        }
    }

    /// A UDP datagram from a client (STUN or ChannelData) arrived on `listener`. ChannelData to
    /// a live channel comes back as a [`Forward::ToPeer`] about `data` itself; STUN leaves its
    /// effects as commands.
    #[must_use = "a Forward is a datagram to send"]
    pub fn handle_client_datagram(
        &mut self,
        client: SocketAddr,
        listener: SocketAddr,
        data: &[u8],
        now: Instant,
    ) -> Option<Forward> {
        self.handle_client_message(client, listener, Transport::Udp, data, now)
    }

    /// One client message (a datagram, or one message the IO layer framed out of a TCP/TLS
    /// stream, RFC 8656 §5) on `listener` over `transport`; as
    /// [`Server::handle_client_datagram`] otherwise. Stream messages may carry ChannelData
    /// padding (RFC 8656 §12.5), which is not forwarded.
    #[must_use = "a Forward is a datagram to send"]
    pub fn handle_client_message(
        &mut self,
        client: SocketAddr,
        listener: SocketAddr,
        transport: Transport,
        data: &[u8],
        now: Instant,
    ) -> Option<Forward> {
        match classify(data) {
            PacketKind::Stun => {
                self.handle_stun(client, listener, transport, data, now);
                None
            }
            PacketKind::ChannelData => {
                self.handle_channel_data(client, listener, transport, data, now)
            }
            PacketKind::Other => None,
        }
    }

    /// Whether the 5-tuple holds an allocation (bound or being bound); a TCP/TLS connection
    /// without one may be closed when idle.
    pub fn has_allocation(
        &self,
        client: SocketAddr,
        listener: SocketAddr,
        transport: Transport,
    ) -> bool {
        self.by_five_tuple
            .contains_key(&(client, listener, transport))
    }

    /// The client's TCP or TLS connection closed: its allocation ends with it (RFC 8656 §5),
    /// kernel entries and relay sockets released through the usual commands.
    pub fn connection_closed(
        &mut self,
        client: SocketAddr,
        listener: SocketAddr,
        transport: Transport,
    ) {
        if let Some(id) = self
            .by_five_tuple
            .get(&(client, listener, transport))
            .copied()
        {
            self.remove_allocation(id, EndReason::ConnectionClosed);
        }
    }

    /// ChannelData from the client (RFC 8656 §12.5): forwarded to the bound peer if the
    /// channel and its permission are live, else dropped. One lookup in the routes the
    /// channel commands installed (see [`effects`]); allocates nothing.
    fn handle_channel_data(
        &self,
        client: SocketAddr,
        listener: SocketAddr,
        transport: Transport,
        data: &[u8],
        now: Instant,
    ) -> Option<Forward> {
        let cd = ChannelData::decode(data).ok()?;
        let route = self
            .commands
            .to_peer(client, listener, transport, cd.channel, now)?;
        // The host gains addresses at runtime: checked per datagram.
        if !self.peer_reachable(route.peer) {
            return None;
        }
        if let Some(key) = route.bandwidth {
            self.charge(key, cd.data.len(), Direction::ToPeer, now)?;
        }
        let start = CHANNEL_DATA_HEADER_LEN;
        Some(Forward::ToPeer {
            relayed: route.relayed,
            peer: route.peer,
            payload: start..start + cd.data.len(),
        })
    }

    /// A datagram from `peer` arrived on the relay socket bound to `relayed`. With a bound
    /// channel it goes to the client as ChannelData (RFC 8656 §12.6): a [`Forward::ToClient`]
    /// naming the header to put in front of `data`, nothing allocated. Without one it goes as a
    /// Data indication (RFC 8656 §11.6), built and queued as a command.
    #[must_use = "a Forward is a datagram to send"]
    pub fn handle_peer_datagram(
        &mut self,
        relayed: SocketAddr,
        peer: SocketAddr,
        data: &[u8],
        now: Instant,
    ) -> Option<Forward> {
        if let Some(route) = self.commands.to_client(relayed, peer, now) {
            let len = u16::try_from(data.len()).ok()?;
            if let Some(key) = route.bandwidth {
                self.charge(key, data.len(), Direction::ToClient, now)?;
            }
            return Some(Forward::ToClient {
                listener: route.listener,
                client: route.client,
                transport: route.transport,
                header: ChannelData::header(route.channel, len),
            });
        }
        let id = self.by_relayed.get(&relayed)?;
        let alloc = self.allocations.get(id)?;
        if !matches!(alloc.state, AllocState::Active)
            || alloc.expires <= now
            || !alloc.has_permission(peer.ip(), now)
        {
            return None;
        }
        let (listener, client, transport) = (alloc.listener, alloc.client, alloc.transport);
        let bound_channel = alloc
            .peer_channels
            .get(&peer)
            .and_then(|n| alloc.channels.get(n).map(|c| (*n, c)))
            .filter(|(_, c)| c.bound && c.expires > now)
            .map(|(n, _)| n);
        let id = *id;
        // Looked up only with a limit configured: the unlimited path stays as it was.
        let key = self
            .config
            .bandwidth
            .as_ref()
            .and_then(|_| self.commands.bandwidth(id));
        if let Some(key) = key {
            self.charge(key, data.len(), Direction::ToClient, now)?;
        }
        if let Some(channel) = bound_channel {
            let len = u16::try_from(data.len()).ok()?;
            return Some(Forward::ToClient {
                listener,
                client,
                transport,
                header: ChannelData::header(channel, len),
            });
        }
        // RFC 8656 §11.6: no channel, so a Data indication.
        let tid = TransactionId::random(&mut self.rng);
        let mut b = MessageBuilder::new(Class::Indication, Method::DATA, tid);
        b.add(&Attribute::XorPeerAddress(peer))
            .add(&Attribute::Data(data));
        if b.len() > usize::from(u16::MAX) {
            return None;
        }
        self.commands.push_back(Command::SendToClient {
            listener,
            client,
            transport,
            payload: b.finish(None, false),
        });
        None
    }

    /// The relay socket for `id` is bound: send the held Allocate success (RFC 8656 §7.2), or,
    /// for the first address of a dual allocation, ask for the second socket.
    pub fn allocation_bound(&mut self, id: AllocationId, now: Instant) {
        let Some(alloc) = self.allocations.get_mut(&id) else {
            return;
        };
        let AllocState::Pending(pending) = &mut alloc.state else {
            return;
        };
        if pending.binding == Slot::Primary {
            if let Some(ip) = pending.additional_ip {
                // RFC 8656 §7.2: the IPv6 address of a dual allocation comes second, from a
                // fresh set of attempts; the IPv4 socket stays bound meanwhile.
                pending.binding = Slot::Additional;
                pending.attempts = 0;
                let exclude = pending.failed.clone();
                return self.bind_additional(id, ip, &exclude, now);
            }
        }
        self.activate(id, now);
    }

    /// Asks for the IPv6 socket of a dual allocation on a free port of `ip`, or (none free)
    /// answers with the IPv4 address alone. EVEN-PORT (R=0) holds for both addresses: the
    /// client asked for even ports on the allocation, not on one family of it.
    fn bind_additional(
        &mut self,
        id: AllocationId,
        ip: IpAddr,
        exclude: &[SocketAddr],
        now: Instant,
    ) {
        let even = match self.allocations.get(&id).map(|a| &a.state) {
            Some(AllocState::Pending(pending)) => pending.even_port,
            _ => false,
        };
        match self.pick_relayed_in(ip.is_ipv6(), even, exclude) {
            Some(relayed) => {
                if let Some(alloc) = self.allocations.get_mut(&id) {
                    alloc.additional = Some(relayed);
                }
                self.index_relayed(relayed, id);
                self.commands
                    .push_back(Command::CreateAllocation { id, relayed });
            }
            None => self.activate_without_additional(id, now),
        }
    }

    /// The IPv6 half of a dual allocation could not be had: RFC 8656 §7.2 answers with the IPv4
    /// relayed address and ADDRESS-ERROR-CODE 508 for IPv6 (insufficient capacity).
    fn activate_without_additional(&mut self, id: AllocationId, now: Instant) {
        let additional = self
            .allocations
            .get_mut(&id)
            .and_then(|alloc| alloc.additional.take());
        if let Some(relayed) = additional {
            if self.by_relayed.get(&relayed) == Some(&id) {
                self.unindex_relayed(relayed);
            }
        }
        let Some(alloc) = self.allocations.get_mut(&id) else {
            return;
        };
        if let AllocState::Pending(pending) = &mut alloc.state {
            pending.family_error = Some((AddressFamily::V6, StunErrorCode::InsufficientCapacity));
        }
        self.activate(id, now);
    }

    /// Every relay socket of `id` is bound: the allocation goes live and the held Allocate
    /// success goes out with one XOR-RELAYED-ADDRESS per relayed address (RFC 8656 §7.2).
    fn activate(&mut self, id: AllocationId, now: Instant) {
        let Some(alloc) = self.allocations.get_mut(&id) else {
            return;
        };
        let AllocState::Pending(pending) = std::mem::replace(&mut alloc.state, AllocState::Active)
        else {
            return;
        };
        let lifetime = alloc.lifetime;
        alloc.expires = now + lifetime;
        alloc.started = now;
        let relayed: Vec<SocketAddr> = alloc.relayed_addresses().collect();
        let ctx = pending.ctx;
        let mut attrs = Vec::with_capacity(relayed.len() + 3);
        for address in &relayed {
            self.config.live_relayed.insert(*address);
            attrs.push(Attribute::XorRelayedAddress(*address));
        }
        attrs.push(Attribute::Lifetime(
            lifetime.as_secs().try_into().unwrap_or(u32::MAX),
        ));
        attrs.push(Attribute::XorMappedAddress(ctx.client));
        if let Some((family, code)) = pending.family_error {
            attrs.push(Attribute::AddressErrorCode {
                family,
                error: code.into(),
            });
        }
        let payload = self.build(&ctx, Class::Success, &attrs);
        if let Some(alloc) = self.allocations.get_mut(&id) {
            alloc.success_response = payload.clone();
        }
        self.schedule(id);
        self.commands.push_back(Command::SendToClient {
            listener: ctx.listener,
            client: ctx.client,
            transport: ctx.transport,
            payload,
        });
    }

    /// The relay socket for `id` could not be bound: try another port, or answer 508 after
    /// `MAX_BIND_ATTEMPTS` (for the IPv6 half of a dual allocation: the IPv4 address alone
    /// with ADDRESS-ERROR-CODE 508).
    pub fn allocation_bind_failed(&mut self, id: AllocationId, now: Instant) {
        let Some(alloc) = self.allocations.get_mut(&id) else {
            return;
        };
        let AllocState::Pending(pending) = &mut alloc.state else {
            return;
        };
        pending.attempts += 1;
        let attempts = pending.attempts;
        let even = pending.even_port;
        let slot = pending.binding;
        let failed = match slot {
            Slot::Primary => alloc.relayed,
            Slot::Additional => match alloc.additional {
                Some(address) => address,
                None => return,
            },
        };
        // The failed address leaves the index (another allocation may get it later, the
        // socket may have been busy only briefly), but this Allocate must not retry it: with a
        // small port range a random pick would otherwise land on it again and waste the
        // attempts before the 508 (RFC 8656 §7.2: 508 only when no relayed address can be had).
        pending.failed.push(failed);
        let exclude = pending.failed.clone();
        if self.by_relayed.get(&failed) == Some(&id) {
            self.unindex_relayed(failed);
        }
        if slot == Slot::Additional {
            if attempts < MAX_BIND_ATTEMPTS {
                return self.bind_additional(id, failed.ip(), &exclude, now);
            }
            return self.activate_without_additional(id, now);
        }
        let next = if attempts < MAX_BIND_ATTEMPTS {
            self.pick_relayed_in(failed.is_ipv6(), even, &exclude)
        } else {
            None
        };
        match next {
            Some(relayed) => {
                if let Some(alloc) = self.allocations.get_mut(&id) {
                    alloc.relayed = relayed;
                }
                self.index_relayed(relayed, id);
                self.commands
                    .push_back(Command::CreateAllocation { id, relayed });
            }
            None => {
                let ctx = match self.allocations.get(&id).map(|a| &a.state) {
                    Some(AllocState::Pending(p)) => p.ctx.clone(),
                    _ => return,
                };
                self.forget_allocation(id);
                let detail = "no relay port could be bound (ports in use by other programs?)";
                self.refuse(&ctx, StunErrorCode::InsufficientCapacity, detail);
            }
        }
    }

    /// The relayed addresses of allocation `id`.
    fn relayed_of(&self, id: AllocationId) -> Option<Vec<SocketAddr>> {
        self.allocations
            .get(&id)
            .map(|a| a.relayed_addresses().collect())
    }

    fn active_on(
        &self,
        client: SocketAddr,
        listener: SocketAddr,
        transport: Transport,
    ) -> Option<&Allocation> {
        let id = self.by_five_tuple.get(&(client, listener, transport))?;
        self.allocations
            .get(id)
            .filter(|a| matches!(a.state, AllocState::Active))
    }

    /// Whether a permission for `ip` may exist (RFC 8656 §9: permissions are per IP address).
    /// The relay's own relayed-address IPs are allowed, for client-to-client through the relay,
    /// unless the operator denies them; which of their ports are reachable is checked when a
    /// datagram is sent ([`Server::peer_reachable`]). Every other address of the host is denied
    /// by the policy.
    fn peer_allowed(&self, ip: IpAddr) -> bool {
        if self.is_relay_ip(ip) {
            return !self.config.policy.explicitly_denied(ip);
        }
        self.config.policy.is_allowed(ip)
    }

    fn is_relay_ip(&self, ip: IpAddr) -> bool {
        self.config.relay_ips.contains(&ip.to_canonical())
    }

    /// Whether a datagram may go to `peer`: on any address of the host only the relayed port
    /// of a live allocation (of any worker) is a destination; any other port could be a host
    /// service. Checked per datagram because the host gains addresses at runtime: a permission
    /// created before its address became the host's must not reach the host.
    fn peer_reachable(&self, peer: SocketAddr) -> bool {
        reachable(&self.config, peer)
    }

    /// Charges a relayed datagram of `bytes` payload bytes to a limited user's budget:
    /// `None` means drop it (over the budget; the ledger counts it).
    fn charge(
        &self,
        key: BandwidthKey,
        bytes: usize,
        direction: Direction,
        now: Instant,
    ) -> Option<()> {
        match &self.config.bandwidth {
            Some(bandwidth) => bandwidth.admit(key, bytes, direction, now).then_some(()),
            None => Some(()),
        }
    }

    /// Removes an allocation from every index without emitting anything.
    fn forget_allocation(&mut self, id: AllocationId) -> Option<Allocation> {
        let alloc = self.allocations.remove(&id)?;
        let active = matches!(alloc.state, AllocState::Active);
        for relayed in alloc.relayed_addresses() {
            if active {
                self.config.live_relayed.remove(relayed);
            }
            if self.by_relayed.get(&relayed) == Some(&id) {
                self.unindex_relayed(relayed);
            }
        }
        self.by_five_tuple
            .remove(&(alloc.client, alloc.listener, alloc.transport));
        // The name the quota was taken under, whatever a reload did to the credentials since.
        self.config.quota.release(&alloc.quota_user);
        if let (Some(key), Some(bandwidth)) =
            (self.commands.take_bandwidth(id), &self.config.bandwidth)
        {
            bandwidth.release(key, id);
        }
        Some(alloc)
    }

    /// Deletes an allocation: its channels leave the fast path, then its sockets close (both of
    /// a dual allocation); a live one leaves its end (and `reason`) for its usage record.
    fn remove_allocation(&mut self, id: AllocationId, reason: EndReason) {
        let Some(alloc) = self.forget_allocation(id) else {
            return;
        };
        self.note_end(&alloc, reason);
        for (number, channel) in &alloc.channels {
            if channel.installed {
                self.commands
                    .push_back(alloc.delete_channel_command(*number, channel.peer));
            }
        }
        for relayed in alloc.relayed_addresses() {
            self.commands
                .push_back(Command::DeleteAllocation { id, relayed });
        }
    }

    /// A free relayed address of the family of `ip`: random picks, then a scan from a random
    /// start, skipping addresses other allocations use and those in `exclude`.
    /// A free relayed address on one of the family's relay IPs: the least used IP first (ties
    /// in turn), then the others, so allocations spread over every relay IP and one whose
    /// ports are all taken leaves the others usable.
    fn pick_relayed_in(
        &mut self,
        v6: bool,
        even: bool,
        exclude: &[SocketAddr],
    ) -> Option<SocketAddr> {
        let mut ips = if v6 {
            self.relay_v6.clone()
        } else {
            self.relay_v4.clone()
        };
        if ips.is_empty() {
            return None;
        }
        let turn = self.next_relay_ip % ips.len();
        self.next_relay_ip = self.next_relay_ip.wrapping_add(1);
        ips.rotate_left(turn);
        ips.sort_by_key(|ip| self.relayed_per_ip.get(ip).copied().unwrap_or(0));
        ips.into_iter()
            .find_map(|ip| self.pick_relayed(ip, even, exclude))
    }

    /// Files `relayed` under allocation `id` (also while its socket is being bound).
    fn index_relayed(&mut self, relayed: SocketAddr, id: AllocationId) {
        if self.by_relayed.insert(relayed, id).is_none() {
            *self.relayed_per_ip.entry(relayed.ip()).or_insert(0) += 1;
        }
    }

    /// Removes `relayed` from the index.
    fn unindex_relayed(&mut self, relayed: SocketAddr) {
        if self.by_relayed.remove(&relayed).is_some() {
            if let Some(count) = self.relayed_per_ip.get_mut(&relayed.ip()) {
                *count = count.saturating_sub(1);
            }
        }
    }

    fn pick_relayed(
        &mut self,
        ip: IpAddr,
        even: bool,
        exclude: &[SocketAddr],
    ) -> Option<SocketAddr> {
        let (lo, hi) = (
            *self.config.port_range.start(),
            *self.config.port_range.end(),
        );
        if lo > hi {
            return None;
        }
        let ok = |port: u16, used: &HashMap<SocketAddr, AllocationId>| {
            let addr = SocketAddr::new(ip, port);
            (!even || port.is_multiple_of(2))
                && !used.contains_key(&addr)
                && !exclude.contains(&addr)
        };
        for _ in 0..RANDOM_PORT_TRIES {
            let port = self.rng.gen_range(lo..=hi);
            if ok(port, &self.by_relayed) {
                return Some(SocketAddr::new(ip, port));
            }
        }
        let span = u32::from(hi - lo) + 1;
        let start = self.rng.gen_range(0..span);
        (0..span)
            .map(|i| lo + ((start + i) % span) as u16)
            .find(|p| ok(*p, &self.by_relayed))
            .map(|p| SocketAddr::new(ip, p))
    }

    // ---- STUN ----

    fn handle_stun(
        &mut self,
        client: SocketAddr,
        listener: SocketAddr,
        transport: Transport,
        data: &[u8],
        now: Instant,
    ) {
        let msg = match Message::decode(data) {
            Ok(msg) => msg,
            Err(DecodeError::NotStun) => return,
            Err(DecodeError::BadAttributes {
                method,
                class,
                transaction_id,
                ..
            }) => {
                // RFC 8489 §6.3.1: malformed requests get 400; anything else is dropped.
                if class == Class::Request {
                    let ctx = Ctx {
                        client,
                        listener,
                        transport,
                        method,
                        tid: transaction_id,
                        fingerprint: false,
                        auth: None,
                    };
                    self.respond_error_unauth(&ctx, StunErrorCode::BadRequest, &[], now);
                }
                return;
            }
        };
        // RFC 8489 §7.3: a FINGERPRINT that does not match means it is not STUN after all.
        if msg.verify_fingerprint() == Some(false) {
            return;
        }
        match msg.class() {
            Class::Request => self.handle_request(&msg, client, listener, transport, now),
            Class::Indication if msg.method() == Method::SEND => {
                if let Some(send) = SendIndication::decode(&msg) {
                    self.handle_send(send, client, listener, transport, now);
                }
            }
            // Other indications and all responses are dropped (RFC 8489 §6.3.2, §6.3.3).
            _ => {}
        }
    }

    fn handle_request(
        &mut self,
        msg: &Message<'_>,
        client: SocketAddr,
        listener: SocketAddr,
        transport: Transport,
        now: Instant,
    ) {
        let mut ctx = Ctx {
            client,
            listener,
            transport,
            method: msg.method(),
            tid: msg.transaction_id(),
            fingerprint: msg.has_fingerprint(),
            auth: None,
        };
        let method = msg.method();
        if method == Method::BINDING {
            self.handle_binding(msg, &ctx, now);
            return;
        }
        if ![
            Method::ALLOCATE,
            Method::REFRESH,
            Method::CREATE_PERMISSION,
            Method::CHANNEL_BIND,
        ]
        .contains(&method)
        {
            // Unknown (or indication-only) method as a request: 400.
            self.respond_error_unauth(&ctx, StunErrorCode::BadRequest, &[], now);
            return;
        }
        let Some(auth) = self.authenticate(msg, &ctx, now) else {
            return;
        };
        ctx.auth = Some(auth);
        // RFC 8489 §6.3.1.1: unknown comprehension-required attributes → 420, after
        // authentication so the answer can be signed.
        let unknown = msg.unknown_comprehension_required();
        if !unknown.is_empty() {
            let list = Attribute::UnknownAttributes(unknown.to_vec());
            self.respond_error(&ctx, StunErrorCode::UnknownAttribute, &[list]);
            return;
        }
        // Each request is decoded once here; a handler answers a decoding error only after the
        // checks the RFC puts first (the 5-tuple's allocation: 437, 441).
        match method {
            Method::ALLOCATE => self.handle_allocate(AllocateRequest::decode(msg), &ctx, now),
            Method::REFRESH => self.handle_refresh(RefreshRequest::decode(msg), &ctx, now),
            Method::CREATE_PERMISSION => {
                self.handle_create_permission(CreatePermissionRequest::decode(msg), &ctx, now)
            }
            _ => {
                let request = ChannelBindRequest::decode(msg, &self.config.channel_range);
                self.handle_channel_bind(request, &ctx, now)
            }
        }
    }

    /// Binding (RFC 8489 §6.3.1): XOR-MAPPED-ADDRESS, no authentication, rate limited.
    fn handle_binding(&mut self, msg: &Message<'_>, ctx: &Ctx, now: Instant) {
        let unknown = msg.unknown_comprehension_required();
        if !unknown.is_empty() {
            let list = Attribute::UnknownAttributes(unknown.to_vec());
            self.respond_error_unauth(ctx, StunErrorCode::UnknownAttribute, &[list], now);
            return;
        }
        let mut reply = ctx.clone();
        reply.fingerprint = true;
        self.respond_unauth(
            &reply,
            Class::Success,
            &[Attribute::XorMappedAddress(ctx.client)],
            now,
        );
    }

    /// Long-term credential check (RFC 8489 §9.2.4). Sends the error itself and returns `None`
    /// when the request must not be processed. Unauthenticated answers (401, 400) are rate
    /// limited per source IP and silently dropped over the limit.
    fn authenticate(&mut self, msg: &Message<'_>, ctx: &Ctx, now: Instant) -> Option<Auth> {
        if !msg.has_integrity() && !msg.has_integrity_sha256() {
            self.respond_unauthenticated(ctx, now);
            return None;
        }
        let (Some(username), Some(_realm), Some(nonce)) =
            (msg.username(), msg.realm(), msg.nonce())
        else {
            self.respond_error_unauth(ctx, StunErrorCode::BadRequest, &[], now);
            return None;
        };
        let sha256 = msg.has_integrity_sha256();
        let key = self
            .config
            .credentials
            .keys_for(username, self.unix_now)
            .into_iter()
            .find(|key| {
                if sha256 {
                    msg.verify_integrity_sha256(key.as_bytes()).is_ok()
                } else {
                    msg.verify_integrity(key.as_bytes()).is_ok()
                }
            });
        let Some(key) = key else {
            self.respond_unauthenticated(ctx, now);
            return None;
        };
        let auth = Auth {
            username: username.to_owned(),
            key,
            sha256,
        };
        match self.nonces.check(nonce, ctx.client, now) {
            NonceCheck::Valid => Some(auth),
            NonceCheck::Stale | NonceCheck::Invalid => {
                // The request itself was authentic, so the 438 is signed; but a captured
                // request replayed from a spoofed source lands here too, so the 438 counts
                // against that source's unauthenticated budget.
                let mut signed = ctx.clone();
                signed.auth = Some(auth);
                let nonce = self.nonces.issue(ctx.client, now);
                let realm = self.config.realm.clone();
                self.respond_error_unauth(
                    &signed,
                    StunErrorCode::StaleNonce,
                    &[Attribute::Realm(&realm), Attribute::Nonce(&nonce)],
                    now,
                );
                None
            }
        }
    }

    fn respond_unauthenticated(&mut self, ctx: &Ctx, now: Instant) {
        let nonce = self.nonces.issue(ctx.client, now);
        let realm = self.config.realm.clone();
        self.respond_error_unauth(
            ctx,
            StunErrorCode::Unauthenticated,
            &[Attribute::Realm(&realm), Attribute::Nonce(&nonce)],
            now,
        );
    }

    fn desired_lifetime(&self, requested: Option<u32>) -> Duration {
        // RFC 8656 §7.2 step 7 / §8: min(requested, max), but never below the default.
        match requested {
            None => self.config.default_lifetime,
            Some(secs) => Duration::from_secs(u64::from(secs))
                .min(self.config.max_lifetime)
                .max(self.config.default_lifetime),
        }
    }

    /// Allocate (RFC 8656 §7.2).
    fn handle_allocate(
        &mut self,
        request: Result<AllocateRequest, Rejection>,
        ctx: &Ctx,
        now: Instant,
    ) {
        let Some(auth) = ctx.auth.clone() else {
            return;
        };
        // Step 2: an allocation on this 5-tuple already. A retransmission of the request that
        // created it gets the same success again.
        if let Some(id) = self
            .by_five_tuple
            .get(&(ctx.client, ctx.listener, ctx.transport))
            .copied()
        {
            let Some(alloc) = self.allocations.get(&id) else {
                return;
            };
            if alloc.last_allocate == ctx.tid {
                if matches!(alloc.state, AllocState::Active) {
                    self.commands.push_back(Command::SendToClient {
                        listener: ctx.listener,
                        client: ctx.client,
                        transport: ctx.transport,
                        payload: alloc.success_response.clone(),
                    });
                }
                // While the socket is being bound the response is still to come.
                return;
            }
            self.respond_error(ctx, StunErrorCode::AllocationMismatch, &[]);
            return;
        }
        // Steps 3 to 6: the attributes.
        let request = match request {
            Ok(request) => request,
            Err(rejection) => return self.reject(ctx, rejection),
        };
        // Draining: no new allocations, whatever the request (RFC 8489 §10: the answer goes to
        // an authenticated request, so the client can trust the alternate it names).
        if self.config.drain.is_draining() {
            return self.refuse_allocation(ctx, Refusal::Draining);
        }
        if self.over_load_threshold(ctx.listener) {
            return self.refuse_allocation(ctx, Refusal::Load);
        }
        // Step 6: the family asked for (IPv4 without REQUESTED-ADDRESS-FAMILY, whatever the
        // client's own family: RFC 6156 relays between families) needs a relay IP of that
        // family, else 440.
        let v6 = match request.family {
            AddressFamily::V4 if !self.relay_v4.is_empty() => false,
            AddressFamily::V6 if !self.relay_v6.is_empty() => true,
            _ => return self.respond_error(ctx, StunErrorCode::AddressFamilyNotSupported, &[]),
        };
        // Step 6, dual allocation: ADDITIONAL-ADDRESS-FAMILY (IPv6) adds an IPv6 relayed
        // address to the IPv4 one. Without an IPv6 relay IP the IPv4 allocation is still made
        // and the IPv6 part is refused with ADDRESS-ERROR-CODE 440.
        let (additional_ip, family_error) = match (request.dual, self.relay_v6.first().copied()) {
            (false, _) => (None, None),
            (true, Some(ip)) => (Some(ip), None),
            (true, None) => (
                None,
                Some((AddressFamily::V6, StunErrorCode::AddressFamilyNotSupported)),
            ),
        };
        // Step 8: quotas.
        // Keyed on the REST username's user part, so minting credentials buys no quota.
        let quota_user = self.config.credentials.quota_user(&auth.username);
        let quota = self.config.quota.try_acquire(
            quota_user,
            self.config.max_allocations_per_user,
            self.config.max_allocations,
        );
        match quota {
            Ok(()) => {}
            Err(QuotaError::User) => {
                let detail = format!(
                    "user {quota_user} holds --max-allocations-per-user {}",
                    self.config.max_allocations_per_user
                );
                return self.refuse(ctx, StunErrorCode::AllocationQuotaReached, &detail);
            }
            // The relay-wide cap: another instance may have room (RFC 8489 §10).
            Err(QuotaError::Total) => return self.refuse_allocation(ctx, Refusal::Capacity),
        }
        let Some(relayed) = self.pick_relayed_in(v6, request.even_port, &[]) else {
            let quota_user = self.config.credentials.quota_user(&auth.username);
            self.config.quota.release(quota_user);
            let detail = "no free port in --port-range on any relay IP of the family";
            return self.refuse(ctx, StunErrorCode::InsufficientCapacity, detail);
        };
        let lifetime = self.desired_lifetime(request.lifetime);
        let id = AllocationId(self.next_id);
        self.next_id += self.config.allocation_id_stride.max(1);
        let alloc = Allocation {
            id,
            username: auth.username.clone(),
            quota_user: self
                .config
                .credentials
                .quota_user(&auth.username)
                .to_owned(),
            key: auth.key.clone(),
            client: ctx.client,
            listener: ctx.listener,
            transport: ctx.transport,
            relayed,
            additional: None,
            lifetime,
            expires: now + lifetime,
            started: now,
            state: AllocState::Pending(Pending {
                ctx: ctx.clone(),
                attempts: 0,
                failed: Vec::new(),
                even_port: request.even_port,
                binding: Slot::Primary,
                additional_ip,
                family_error,
            }),
            last_allocate: ctx.tid,
            success_response: Vec::new(),
            permissions: HashMap::new(),
            channels: BTreeMap::new(),
            peer_channels: HashMap::new(),
            scheduled: None,
        };
        self.allocations.insert(id, alloc);
        if let Some(bandwidth) = &self.config.bandwidth {
            let user = self.config.credentials.quota_user(&auth.username);
            if let Some(key) = bandwidth.register(user, id) {
                self.commands.set_bandwidth(id, key);
            }
        }
        self.schedule(id);
        self.by_five_tuple
            .insert((ctx.client, ctx.listener, ctx.transport), id);
        self.index_relayed(relayed, id);
        self.commands
            .push_back(Command::CreateAllocation { id, relayed });
    }

    /// The live allocation of a request's 5-tuple, or a 437 (or 441 for another user's
    /// credentials, RFC 8656 §5) already sent.
    fn allocation_for(&mut self, ctx: &Ctx) -> Option<AllocationId> {
        let id = self
            .by_five_tuple
            .get(&(ctx.client, ctx.listener, ctx.transport))
            .copied()
            .filter(|id| {
                self.allocations
                    .get(id)
                    .is_some_and(|a| matches!(a.state, AllocState::Active))
            });
        let Some(id) = id else {
            self.respond_error(ctx, StunErrorCode::AllocationMismatch, &[]);
            return None;
        };
        let same_user = match (&ctx.auth, self.allocations.get(&id)) {
            (Some(auth), Some(alloc)) => auth.username == alloc.username,
            _ => false,
        };
        if !same_user {
            self.respond_error(ctx, StunErrorCode::WrongCredentials, &[]);
            return None;
        }
        Some(id)
    }

    /// Refresh (RFC 8656 §8).
    fn handle_refresh(&mut self, request: RefreshRequest, ctx: &Ctx, now: Instant) {
        let Some(id) = self.allocation_for(ctx) else {
            return;
        };
        let Some(families) = self.allocations.get(&id).map(|a| {
            a.relayed_addresses()
                .map(|r| AddressFamily::of(r.ip()))
                .collect::<Vec<_>>()
        }) else {
            return;
        };
        // RFC 8656 §8: a family the allocation has no relayed address of → 443. A dual
        // allocation has one lifetime, so naming either of its families refreshes (or, with
        // LIFETIME 0, deletes) all of it.
        if matches!(request.family, Some(f) if !families.contains(&f)) {
            return self.respond_error(ctx, StunErrorCode::PeerAddressFamilyMismatch, &[]);
        }
        let lifetime = if request.lifetime == Some(0) {
            self.remove_allocation(id, EndReason::Refresh);
            Duration::ZERO
        } else {
            let lifetime = self.desired_lifetime(request.lifetime);
            if let Some(alloc) = self.allocations.get_mut(&id) {
                alloc.expires = now + lifetime;
                // The kernel's deadlines include the allocation's: move them with it.
                let reachable = |peer| reachable(&self.config, peer);
                alloc.announce_channels(None, &reachable, &mut self.commands);
                alloc.announce_permissions(&mut self.commands);
            }
            self.schedule(id);
            lifetime
        };
        let secs = lifetime.as_secs().try_into().unwrap_or(u32::MAX);
        self.respond(ctx, Class::Success, &[Attribute::Lifetime(secs)]);
    }

    /// Checks the XOR-PEER-ADDRESSes of CreatePermission / ChannelBind (at least one, their
    /// decoding saw to that) against the allocation's relayed families (443, RFC 8656 §9, §12:
    /// each peer needs a relayed address of its own family) and the peer policy (403); sends
    /// the error and returns false if one fails.
    fn check_peers(&mut self, ctx: &Ctx, relayed: &[SocketAddr], peers: &[SocketAddr]) -> bool {
        let has_family = |p: &SocketAddr| relayed.iter().any(|r| same_family(p.ip(), r.ip()));
        if !peers.iter().all(has_family) {
            self.respond_error(ctx, StunErrorCode::PeerAddressFamilyMismatch, &[]);
            return false;
        }
        if let Some(denied) = peers.iter().find(|p| !self.peer_allowed(p.ip())) {
            let detail = self.deny_detail(denied.ip());
            self.refuse(ctx, StunErrorCode::Forbidden, &detail);
            return false;
        }
        true
    }

    /// CreatePermission (RFC 8656 §10.2): all peers or none.
    fn handle_create_permission(
        &mut self,
        request: Result<CreatePermissionRequest, Rejection>,
        ctx: &Ctx,
        now: Instant,
    ) {
        let Some(id) = self.allocation_for(ctx) else {
            return;
        };
        let Some(relayed) = self.relayed_of(id) else {
            return;
        };
        let peers = match request {
            Ok(request) => request.peers,
            Err(rejection) => return self.reject(ctx, rejection),
        };
        if !self.check_peers(ctx, &relayed, &peers) {
            return;
        }
        let cap = self.config.max_permissions_per_allocation;
        let lifetime = self.config.permission_lifetime;
        let Some(alloc) = self.allocations.get_mut(&id) else {
            return;
        };
        let mut new_ips: Vec<IpAddr> = peers
            .iter()
            .map(|p| p.ip())
            .filter(|ip| !alloc.permissions.contains_key(ip))
            .collect();
        new_ips.sort_unstable();
        new_ips.dedup();
        if alloc.permissions.len() + new_ips.len() > cap {
            let detail = format!("{cap} permissions per allocation");
            return self.refuse(ctx, StunErrorCode::InsufficientCapacity, &detail);
        }
        for peer in &peers {
            let reachable = |peer| reachable(&self.config, peer);
            alloc.install_permission(peer.ip(), now + lifetime, &reachable, &mut self.commands);
        }
        self.schedule(id);
        self.respond(ctx, Class::Success, &[]);
    }

    /// ChannelBind (RFC 8656 §12.2).
    fn handle_channel_bind(
        &mut self,
        request: Result<ChannelBindRequest, Rejection>,
        ctx: &Ctx,
        now: Instant,
    ) {
        let Some(id) = self.allocation_for(ctx) else {
            return;
        };
        let Some(relayed) = self.relayed_of(id) else {
            return;
        };
        let ChannelBindRequest {
            channel: number,
            peer,
        } = match request {
            Ok(request) => request,
            Err(rejection) => return self.reject(ctx, rejection),
        };
        if !self.check_peers(ctx, &relayed, &[peer]) {
            return;
        }
        // A channel carries datagrams to one transport address (RFC 8656 §12): port 0 is none.
        if peer.port() == 0 {
            return self.respond_error(ctx, StunErrorCode::BadRequest, &[]);
        }
        // A channel names a transport address: on a relay IP only a live allocation's relayed
        // port is one (client-to-client); any other port would be a service on the host.
        if !self.peer_reachable(peer) {
            let detail = format!("peer {peer} is an address of this host but no live relayed port");
            return self.refuse(ctx, StunErrorCode::Forbidden, &detail);
        }
        let cap = self.config.max_permissions_per_allocation;
        let channel_cap = self.config.max_channels_per_allocation;
        let channel_lifetime = self.config.channel_lifetime;
        let permission_lifetime = self.config.permission_lifetime;
        let Some(alloc) = self.allocations.get_mut(&id) else {
            return;
        };
        // The channel is bound (or reserved after expiry) to another peer, or the peer to
        // another channel: 400. A binding in its reserved period may be renewed for the same
        // pair.
        if alloc.channels.get(&number).is_some_and(|c| c.peer != peer)
            || alloc.peer_channels.get(&peer).is_some_and(|n| *n != number)
        {
            return self.respond_error(ctx, StunErrorCode::BadRequest, &[]);
        }
        if !alloc.permissions.contains_key(&peer.ip()) && alloc.permissions.len() >= cap {
            let detail = format!("{cap} permissions per allocation");
            return self.refuse(ctx, StunErrorCode::InsufficientCapacity, &detail);
        }
        // Channels (bound or reserved) are capped so one client cannot fill the kernel's
        // shared channel table.
        if !alloc.channels.contains_key(&number) && alloc.channels.len() >= channel_cap {
            let detail = format!("{channel_cap} channels per allocation (bound or reserved)");
            return self.refuse(ctx, StunErrorCode::InsufficientCapacity, &detail);
        }
        let expires_at = now + channel_lifetime;
        alloc.channels.insert(
            number,
            Channel {
                peer,
                expires: expires_at,
                bound: true,
                installed: false,
            },
        );
        alloc.peer_channels.insert(peer, number);
        // Installs the permission and (re)announces the binding to the fast path.
        let reachable = |peer| reachable(&self.config, peer);
        alloc.install_permission(
            peer.ip(),
            now + permission_lifetime,
            &reachable,
            &mut self.commands,
        );
        self.schedule(id);
        self.respond(ctx, Class::Success, &[]);
    }

    /// Send indication (RFC 8656 §11.2): forwarded if there is a permission, else dropped.
    fn handle_send(
        &mut self,
        send: SendIndication<'_>,
        client: SocketAddr,
        listener: SocketAddr,
        transport: Transport,
        now: Instant,
    ) {
        let SendIndication { peer, data } = send;
        let Some(alloc) = self.active_on(client, listener, transport) else {
            return;
        };
        // Port 0 is no destination; the kernel would refuse the send anyway.
        if peer.port() == 0 || !alloc.has_permission(peer.ip(), now) {
            return;
        }
        // RFC 8656 §11.2: out of the relayed address of the peer's family; a family the
        // allocation lacks has no permission either, so this only guards the invariant.
        let Some(relayed) = alloc.relayed_for(peer.ip()) else {
            return;
        };
        if !self.peer_reachable(peer) {
            return;
        }
        let key = self
            .config
            .bandwidth
            .as_ref()
            .and_then(|_| self.commands.bandwidth(alloc.id));
        if let Some(key) = key {
            if self
                .charge(key, data.len(), Direction::ToPeer, now)
                .is_none()
            {
                return;
            }
        }
        self.commands.push_back(Command::SendToPeer {
            relayed,
            peer,
            payload: data.to_vec(),
        });
    }

    // ---- responses ----

    fn build(&self, ctx: &Ctx, class: Class, attrs: &[Attribute<'_>]) -> Vec<u8> {
        let mut b = MessageBuilder::new(class, ctx.method, ctx.tid);
        for a in attrs {
            b.add(a);
        }
        if let Some(software) = &self.config.software {
            b.add(&Attribute::Software(software));
        }
        let integrity = ctx.auth.as_ref().map(|auth| {
            if auth.sha256 {
                Integrity::Sha256(auth.key.as_bytes())
            } else {
                Integrity::Sha1(auth.key.as_bytes())
            }
        });
        b.finish_with(integrity, ctx.fingerprint)
    }

    fn respond(&mut self, ctx: &Ctx, class: Class, attrs: &[Attribute<'_>]) {
        let payload = self.build(ctx, class, attrs);
        self.commands.push_back(Command::SendToClient {
            listener: ctx.listener,
            client: ctx.client,
            transport: ctx.transport,
            payload,
        });
    }

    /// Answers a request whose decoding failed.
    fn reject(&mut self, ctx: &Ctx, rejection: Rejection) {
        if rejection.unknown.is_empty() {
            self.respond_error(ctx, rejection.code, &[]);
        } else {
            let list = Attribute::UnknownAttributes(rejection.unknown);
            self.respond_error(ctx, rejection.code, &[list]);
        }
    }

    /// Answers a request that was not authenticated (or whose nonce failed: 438) within the
    /// source's relay-wide byte budget ([`UnauthLimiter`], RFC 8656 §21 amplification); over
    /// it the answer is dropped and counted. A TCP or TLS client completed a handshake from its
    /// address, so it cannot be a spoofed victim: its answers are not budgeted (its
    /// connection count is limited instead).
    fn respond_unauth(&mut self, ctx: &Ctx, class: Class, attrs: &[Attribute<'_>], now: Instant) {
        let payload = self.build(ctx, class, attrs);
        if ctx.transport.is_stream()
            || self
                .config
                .unauth_limiter
                .try_send(ctx.client.ip(), payload.len(), now)
        {
            self.commands.push_back(Command::SendToClient {
                listener: ctx.listener,
                client: ctx.client,
                transport: ctx.transport,
                payload,
            });
        }
    }

    /// Counts an error response and logs it at debug, with the client, the method, the code
    /// and the user it concerned: an operator whose users cannot connect sees why.
    fn note_refusal(&mut self, ctx: &Ctx, code: StunErrorCode) {
        self.note_refusal_because(ctx, code, "");
    }

    /// [`Server::note_refusal`] with what exactly refused it (the policy rule and peer, the
    /// cap and its value), for the operator reading the debug log.
    fn note_refusal_because(&mut self, ctx: &Ctx, code: StunErrorCode, detail: &str) {
        *self.error_responses.entry((ctx.method, code)).or_insert(0) += 1;
        tracing::debug!(
            client = %ctx.client,
            transport = ctx.transport.label(),
            method = ctx.method.label(),
            code = code.code(),
            reason = code.reason(),
            user = ctx.auth.as_ref().map_or("-", |auth| auth.username.as_str()),
            detail,
            "request refused"
        );
    }

    /// An error response whose log line says what refused the request.
    fn refuse(&mut self, ctx: &Ctx, code: StunErrorCode, detail: &str) {
        self.note_refusal_because(ctx, code, detail);
        self.respond(ctx, Class::Error, &[Attribute::ErrorCode(code.into())]);
    }

    /// Why the peer policy refuses `ip`, for the refusal log.
    fn deny_detail(&self, ip: IpAddr) -> String {
        match self.config.policy.check(ip) {
            Err(reason) => format!("peer {ip} denied by the peer policy: {reason}"),
            Ok(()) => format!("peer {ip} is a relay address denied by --deny-peer"),
        }
    }

    /// Error responses sent so far, by method and code.
    pub fn error_responses(&self) -> impl Iterator<Item = (Method, StunErrorCode, u64)> + '_ {
        self.error_responses
            .iter()
            .map(|(&(method, code), &count)| (method, code, count))
    }

    fn respond_error_unauth(
        &mut self,
        ctx: &Ctx,
        code: StunErrorCode,
        extra: &[Attribute<'_>],
        now: Instant,
    ) {
        self.note_refusal(ctx, code);
        let mut attrs = Vec::with_capacity(extra.len() + 1);
        attrs.push(Attribute::ErrorCode(code.into()));
        attrs.extend_from_slice(extra);
        self.respond_unauth(ctx, Class::Error, &attrs, now);
    }

    fn respond_error(&mut self, ctx: &Ctx, code: StunErrorCode, extra: &[Attribute<'_>]) {
        self.note_refusal(ctx, code);
        let mut attrs = Vec::with_capacity(extra.len() + 1);
        attrs.push(Attribute::ErrorCode(code.into()));
        attrs.extend_from_slice(extra);
        self.respond(ctx, Class::Error, &attrs);
    }
}
