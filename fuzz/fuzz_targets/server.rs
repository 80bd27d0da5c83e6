//! Stateful target: drives one `Server` with an arbitrary sequence of client datagrams (raw
//! bytes, and well-formed signed requests so the fuzzer gets past MESSAGE-INTEGRITY), peer
//! datagrams, relay socket bind successes and failures, and time steps, and checks after every
//! step:
//!
//! - the quota ledger counts exactly the live allocations (every bind is answered at once, so
//!   none is pending between steps), and nothing once everything expired;
//! - every installed channel binding is removed exactly once (no delete without a create, none
//!   left once everything expired);
//! - nothing is ever sent to, or bound towards, a peer the policy denies at that moment (the
//!   relay's own addresses only at live relayed ports, RFC 8656 §9 / architecture "Safety
//!   defaults"), also after the host gained that address at runtime.
#![no_main]

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rand::{rngs::StdRng, SeedableRng};
use relay_proto::{
    auth::{rest_password, Credentials, LongTermKey},
    channel_data::ChannelData,
    policy::PeerPolicy,
    server::{AllocationQuota, Command, Forward, LiveRelayed, QuotaLedger, Server, ServerConfig},
    stun::{AddressFamily, Attribute, Class, Message, MessageBuilder, Method, TransactionId},
    Transport,
};

const REALM: &str = "relay.fuzz";
const SECRET: &str = "fuzz-secret";
const UNIX_NOW: u64 = 1_700_000_000;

/// Reads the fuzzer's bytes as decisions; zeros once they run out.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[usize::from(self.byte()) % from.len()]
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("literal")
}

struct Rig {
    server: Server<StdRng>,
    quota: Arc<QuotaLedger>,
    live: Arc<LiveRelayed>,
    policy: PeerPolicy,
    relay_ips: Vec<IpAddr>,
    now: Instant,
    nonces: HashMap<SocketAddr, String>,
    relayed: BTreeSet<SocketAddr>,
    installed: BTreeSet<(u64, SocketAddr, SocketAddr, u16)>,
    next_tid: u64,
}

impl Rig {
    fn new() -> Self {
        let mut credentials = Credentials::new(REALM);
        credentials.add_user("alice", "alice-pw");
        credentials.add_user("bob", "bob-pw");
        credentials.add_rest_secret(SECRET);
        let mut policy = PeerPolicy::safe_default();
        policy.allow("10.0.0.0/8".parse().expect("cidr"));
        policy
            .add_nat64_prefix("64:ff9b:1:abcd::/96".parse().expect("cidr"))
            .expect("RFC 6052 length");
        policy.allow("64:ff9b:1::/48".parse().expect("cidr"));
        let relay_ips: Vec<IpAddr> = vec![
            "203.0.113.1".parse().expect("ip"),
            "2606:4700:ffff::1".parse().expect("ip"),
        ];
        policy.set_relay_addresses(&relay_ips);
        policy
            .host_addresses()
            .replace(["8.8.4.4".parse().expect("ip")]);
        let mut config = ServerConfig::new(REALM, relay_ips.clone(), credentials, policy.clone());
        let quota = Arc::new(QuotaLedger::default());
        let live = Arc::new(LiveRelayed::default());
        config.quota = Arc::clone(&quota) as Arc<dyn AllocationQuota>;
        config.live_relayed = Arc::clone(&live);
        config.port_range = 50_000..=50_011;
        config.max_allocations = 6;
        config.max_allocations_per_user = 3;
        config.max_permissions_per_allocation = 4;
        config.max_channels_per_allocation = 3;
        config.nonce_lifetime = Duration::from_secs(120);
        let now = Instant::now();
        Self {
            server: Server::new(config, StdRng::seed_from_u64(1), now, UNIX_NOW),
            quota,
            live,
            policy,
            relay_ips,
            now,
            nonces: HashMap::new(),
            relayed: BTreeSet::new(),
            installed: BTreeSet::new(),
            next_tid: 0,
        }
    }

    fn tid(&mut self) -> TransactionId {
        self.next_tid += 1;
        let mut id = [0xf2; 12];
        id[4..].copy_from_slice(&self.next_tid.to_be_bytes());
        TransactionId(id)
    }

    /// Whether the relay may send to `peer`: the policy allows it, or it is a live relayed
    /// address of this relay (client-to-client).
    fn may_reach(&self, peer: SocketAddr) -> bool {
        let ip = peer.ip().to_canonical();
        if self.relay_ips.contains(&ip) {
            return self.live.contains(peer);
        }
        self.policy.is_allowed(ip)
    }

    /// Checks a relayed-data decision: a datagram only ever goes to a reachable peer from a
    /// relayed address of this relay.
    fn check_forward(&self, forward: Option<Forward>) {
        if let Some(Forward::ToPeer { relayed, peer, .. }) = forward {
            assert!(self.may_reach(peer), "forwarded to denied peer {peer}");
            assert!(self.relayed.contains(&relayed), "unknown relayed {relayed}");
        }
    }

    /// Executes every command, answering binds from the input, and checks the invariants.
    fn drain(&mut self, input: &mut Input<'_>) {
        while let Some(command) = self.server.next_command() {
            match command {
                Command::SendToClient {
                    client, payload, ..
                } => {
                    if let Some(nonce) = Message::decode(&payload)
                        .ok()
                        .and_then(|m| m.nonce().map(str::to_owned))
                    {
                        self.nonces.insert(client, nonce);
                    }
                }
                Command::SendToPeer { relayed, peer, .. } => {
                    assert!(
                        self.may_reach(peer),
                        "sent to denied peer {peer} from {relayed}"
                    );
                    assert!(self.relayed.contains(&relayed), "unknown relayed {relayed}");
                }
                Command::CreateAllocation { id, relayed } => {
                    self.relayed.insert(relayed);
                    if input.byte() % 5 == 4 {
                        self.server.allocation_bind_failed(id, self.now);
                    } else {
                        self.server.allocation_bound(id, self.now);
                    }
                }
                Command::DeleteAllocation { .. } => {}
                Command::CreateChannelBinding {
                    id,
                    relayed,
                    peer,
                    channel,
                    ..
                } => {
                    assert!(self.may_reach(peer), "channel to denied peer {peer}");
                    self.installed.insert((id.0, relayed, peer, channel));
                }
                Command::DeleteChannelBinding {
                    id,
                    relayed,
                    peer,
                    channel,
                    ..
                } => {
                    assert!(
                        self.installed.remove(&(id.0, relayed, peer, channel)),
                        "channel {channel:#x} of {id} to {peer} deleted without being installed"
                    );
                }
                Command::CreatePermission { .. } | Command::DeletePermission { .. } => {}
            }
        }
        let live = self.server.allocations().count();
        assert_eq!(self.quota.total(), live, "quota counts vs live allocations");
    }
}

const CLIENTS: [&str; 4] = [
    "192.0.2.1:1000",
    "192.0.2.1:1001",
    "198.51.100.7:5000",
    "[2001:db8::7]:5000",
];
const LISTENERS: [&str; 2] = ["203.0.113.1:3478", "[2606:4700:ffff::1]:3478"];
const PEERS: [&str; 14] = [
    "8.8.8.8:9",
    "10.1.2.3:9",
    "198.18.0.5:9",
    "127.0.0.1:9",
    "169.254.169.254:80",
    "203.0.113.1:22",
    "203.0.113.1:50000",
    "203.0.113.1:50001",
    "8.8.4.4:9",
    "[2606:4700::1]:9",
    "[::1]:9",
    "[64:ff9b::808:808]:9",
    "[64:ff9b:1:abcd::a9fe:a9fe]:80",
    "[64:ff9b:1:abcd::808:808]:9",
];
const USERS: [&str; 5] = ["alice", "bob", "rest:carol", "rest:dave", "nobody"];

fn credential(user: &str, skew: u8) -> (String, LongTermKey) {
    match user.strip_prefix("rest:") {
        Some(name) => {
            let username = format!("{}:{name}", UNIX_NOW + 600 + u64::from(skew % 3));
            let password = rest_password(SECRET.as_bytes(), &username).expect("hmac");
            let key = LongTermKey::derive(&username, REALM, &password);
            (username, key)
        }
        None => {
            let password = format!("{user}-pw");
            (user.to_owned(), LongTermKey::derive(user, REALM, &password))
        }
    }
}

fn step(rig: &mut Rig, input: &mut Input<'_>) {
    let client = sa(input.pick(&CLIENTS));
    let listener = if client.is_ipv4() {
        sa(LISTENERS[0])
    } else {
        sa(LISTENERS[1])
    };
    // The same addresses over UDP, TCP and TLS are three 5-tuples (RFC 8656 §5).
    let transport = input.pick(&[
        Transport::Udp,
        Transport::Udp,
        Transport::Tcp,
        Transport::Tls,
    ]);
    match input.byte() % 9 {
        0 => {
            let len = usize::from(input.byte());
            let data = input.take(len).to_vec();
            let forward = rig
                .server
                .handle_client_message(client, listener, transport, &data, rig.now);
            rig.check_forward(forward);
        }
        1 | 2 => {
            let tid = rig.tid();
            let method = input.pick(&[
                Method::ALLOCATE,
                Method::REFRESH,
                Method::CREATE_PERMISSION,
                Method::CHANNEL_BIND,
                Method::BINDING,
            ]);
            let mut b = MessageBuilder::new(Class::Request, method, tid);
            let flags = input.byte();
            let peer = sa(input.pick(&PEERS));
            let number = input.pick(&[0x4000u16, 0x4001, 0x4fff, 0x5000, 0x3fff]);
            if method == Method::ALLOCATE {
                b.add(&Attribute::RequestedTransport(if flags & 1 == 0 {
                    17
                } else {
                    6
                }));
                if flags & 2 != 0 {
                    b.add(&Attribute::RequestedAddressFamily(AddressFamily::V6));
                }
                if flags & 4 != 0 {
                    b.add(&Attribute::AdditionalAddressFamily(AddressFamily::V6));
                }
                if flags & 8 != 0 {
                    b.add(&Attribute::EvenPort(flags & 16 != 0));
                }
            }
            if method == Method::REFRESH || (method == Method::ALLOCATE && flags & 32 != 0) {
                let lifetime = input.pick(&[0u32, 1, 600, 3600, u32::MAX]);
                b.add(&Attribute::Lifetime(lifetime));
            }
            if method == Method::CREATE_PERMISSION || method == Method::CHANNEL_BIND {
                b.add(&Attribute::XorPeerAddress(peer));
            }
            if method == Method::CHANNEL_BIND {
                b.add(&Attribute::ChannelNumber(number));
            }
            let user = input.pick(&USERS);
            let skew = input.byte();
            let (username, key) = credential(user, skew);
            let nonce = rig
                .nonces
                .get(&client)
                .cloned()
                .unwrap_or_else(|| "A".repeat(32));
            let bytes = if flags & 64 != 0 {
                b.finish(None, flags & 128 != 0)
            } else {
                b.add(&Attribute::Username(&username))
                    .add(&Attribute::Realm(REALM))
                    .add(&Attribute::Nonce(&nonce));
                b.finish(Some(key.as_bytes()), flags & 128 != 0)
            };
            let forward = rig
                .server
                .handle_client_message(client, listener, transport, &bytes, rig.now);
            rig.check_forward(forward);
        }
        3 => {
            let channel = input.pick(&[0x4000u16, 0x4001, 0x4fff]);
            let len = usize::from(input.byte());
            let data = input.take(len);
            let bytes = ChannelData { channel, data }.encode(input.byte() & 1 == 0);
            let forward = rig
                .server
                .handle_client_message(client, listener, transport, &bytes, rig.now);
            rig.check_forward(forward);
        }
        4 => {
            let peer = sa(input.pick(&PEERS));
            let len = usize::from(input.byte());
            let data = input.take(len);
            let tid = rig.tid();
            let mut b = MessageBuilder::new(Class::Indication, Method::SEND, tid);
            b.add(&Attribute::XorPeerAddress(peer))
                .add(&Attribute::Data(data));
            let bytes = b.finish(None, false);
            let forward = rig
                .server
                .handle_client_message(client, listener, transport, &bytes, rig.now);
            rig.check_forward(forward);
        }
        5 => {
            let relayed: Vec<SocketAddr> = rig.relayed.iter().copied().collect();
            let relayed = if relayed.is_empty() {
                sa("203.0.113.1:50000")
            } else {
                input.pick(&relayed)
            };
            let peer = sa(input.pick(&PEERS));
            let len = usize::from(input.byte());
            let data = input.take(len);
            let forward = rig
                .server
                .handle_peer_datagram(relayed, peer, data, rig.now);
            rig.check_forward(forward);
        }
        7 => {
            // The host gains or loses addresses at runtime (netlink): a permission created
            // before an address became the host's must not reach it afterwards.
            let hosts = input.pick(&[
                &["8.8.4.4"][..],
                &["8.8.4.4", "8.8.8.8"][..],
                &["10.1.2.3", "2606:4700::1"][..],
                &[][..],
            ]);
            rig.policy
                .host_addresses()
                .replace(hosts.iter().map(|h| h.parse::<IpAddr>().expect("literal")));
        }
        8 => {
            // A TCP/TLS client's connection closes: its allocation ends (RFC 8656 §5).
            rig.server.connection_closed(client, listener, transport);
        }
        _ => {
            let scale = input.pick(&[1u64, 1_000, 30_000, 300_000]);
            rig.now += Duration::from_millis(u64::from(input.byte()) * scale);
            rig.server.handle_timeout(rig.now);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut rig = Rig::new();
    let mut input = Input(data);
    let mut steps = 0;
    while !input.done() && steps < 256 {
        step(&mut rig, &mut input);
        rig.drain(&mut input);
        steps += 1;
    }
    // Everything expires: the ledger empties and every installed binding was removed.
    rig.now += Duration::from_secs(4 * 3600);
    rig.server.handle_timeout(rig.now);
    rig.drain(&mut input);
    assert_eq!(
        rig.quota.total(),
        0,
        "quota left after every allocation expired"
    );
    assert!(
        rig.installed.is_empty(),
        "bindings never removed: {:?}",
        rig.installed
    );
    for relayed in &rig.relayed {
        assert!(!rig.live.contains(*relayed), "{relayed} still live");
    }
    let _ = rig.server.poll_timeout();
    let _ = rig.quota.of_user("alice");
});
