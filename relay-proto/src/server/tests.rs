//! Server state-machine tests.
//!
//! A simulated client builds real STUN/TURN requests with [`MessageBuilder`] and long-term
//! credentials, learns REALM and NONCE from a 401 like a real client, and feeds the datagrams into
//! [`Server`]. Time is an `Instant` advanced by hand and the server RNG is seeded, so every run is
//! the same. Every test asserts the exact [`Command`]s that come out; responses are decoded with
//! the crate's own [`Message::decode`] and checked for class, error code, attributes, integrity and
//! fingerprint.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use sha1::Sha1;

use std::sync::Arc;

use super::{
    AllocationId, AllocationQuota, Command, QuotaLedger, Server, ServerConfig, CHANNEL_COOLDOWN,
    MAX_BIND_ATTEMPTS,
};
use crate::auth::{Credentials, LongTermKey};
use crate::channel_data::ChannelData;
use crate::policy::PeerPolicy;
use crate::stun::{
    attr_type, AddressFamily, Attribute, Class, ErrorCode, Integrity, Message, MessageBuilder,
    Method, TransactionId, MAGIC_COOKIE,
};

const REALM: &str = "relay.test";
const ALICE: (&str, &str) = ("alice", "alice-password");
const BOB: (&str, &str) = ("bob", "bob-password");
const REST_SECRET: &str = "rest-shared-secret";
const UNIX_NOW: u64 = 1_700_000_000;
const UDP: u8 = 17;
const TCP: u8 = 6;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip literal")
}

/// The relay's IPv4 address; 203.0.113.0/24 is allowed as a peer range in the test policy so
/// that the "relay's own address" rule is what denies it.
fn relay_v4() -> IpAddr {
    ip("203.0.113.1")
}

fn relay_v6() -> IpAddr {
    ip("2001:db8::1")
}

fn listener() -> SocketAddr {
    sa("203.0.113.1:3478")
}

fn peer1() -> SocketAddr {
    sa("93.184.216.34:6000")
}

fn peer2() -> SocketAddr {
    sa("1.1.1.1:7000")
}

fn peer_v6() -> SocketAddr {
    sa("[2606:4700:4700::1111]:8000")
}

fn base_config() -> ServerConfig {
    let mut credentials = Credentials::new(REALM);
    credentials.add_user(ALICE.0, ALICE.1);
    credentials.add_user(BOB.0, BOB.1);
    credentials.add_rest_secret(REST_SECRET);
    let mut policy = PeerPolicy::safe_default();
    policy.allow("203.0.113.0/24".parse().expect("cidr"));
    ServerConfig::new(REALM, vec![relay_v4()], credentials, policy)
}

/// The server plus the simulated clock.
struct Harness {
    server: Server<StdRng>,
    /// The allocation counts the server takes from, read by the quota tests.
    quota: Arc<QuotaLedger>,
    now: Instant,
    /// The fast path's permission commands, kept apart so the other tests see the commands
    /// they are about (`permission_commands_follow_the_permissions` checks these).
    permissions: Vec<Command>,
}

impl Harness {
    fn new() -> Self {
        Self::with_config(|_| {})
    }

    fn with_config(tweak: impl FnOnce(&mut ServerConfig)) -> Self {
        Self::with_seed(7, tweak)
    }

    fn with_seed(seed: u64, tweak: impl FnOnce(&mut ServerConfig)) -> Self {
        let mut config = base_config();
        let quota = Arc::new(QuotaLedger::default());
        config.quota = Arc::clone(&quota) as Arc<dyn AllocationQuota>;
        tweak(&mut config);
        let now = Instant::now();
        let server = Server::new(config, StdRng::seed_from_u64(seed), now, UNIX_NOW);
        Self {
            server,
            quota,
            now,
            permissions: Vec::new(),
        }
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    fn drain(&mut self) -> Vec<Command> {
        let mut commands = Vec::new();
        while let Some(command) = self.server.next_command() {
            match command {
                Command::CreatePermission { .. } | Command::DeletePermission { .. } => {
                    self.permissions.push(command)
                }
                other => commands.push(other),
            }
        }
        commands
    }

    /// A datagram from `client` on its listener; returns everything the server emits.
    fn client_sends(&mut self, client: &Client, bytes: &[u8]) -> Vec<Command> {
        self.server
            .handle_client_datagram(client.addr, client.listener, bytes, self.now);
        self.drain()
    }

    /// A datagram from `peer` to `relayed`; returns everything the server emits.
    fn peer_sends(&mut self, relayed: SocketAddr, peer: SocketAddr, bytes: &[u8]) -> Vec<Command> {
        self.server
            .handle_peer_datagram(relayed, peer, bytes, self.now);
        self.drain()
    }

    /// Runs the timers at the current time.
    fn tick(&mut self) -> Vec<Command> {
        self.server.handle_timeout(self.now);
        self.drain()
    }

    /// Sends `bytes` and expects exactly one response: to this client, from its listener,
    /// carrying `tid`.
    #[track_caller]
    fn transact(&mut self, client: &Client, bytes: &[u8], tid: TransactionId) -> Vec<u8> {
        let commands = self.client_sends(client, bytes);
        one_reply(commands, client, tid)
    }

    /// A signed request as a real client sends it: if the client has no nonce yet, the same
    /// request goes out unauthenticated first and must draw a 401 with REALM and NONCE.
    /// Returns the commands the signed request produced.
    #[track_caller]
    fn signed_commands(
        &mut self,
        client: &mut Client,
        method: Method,
        attrs: &[Attribute<'_>],
    ) -> (TransactionId, Vec<Command>) {
        if client.nonce.is_none() {
            self.challenge(client, method, attrs);
        }
        let tid = client.tid();
        let bytes = client.build(tid, method, attrs, true);
        (tid, self.client_sends(client, &bytes))
    }

    /// Like [`Harness::signed_commands`], expecting exactly one response.
    #[track_caller]
    fn request(&mut self, client: &mut Client, method: Method, attrs: &[Attribute<'_>]) -> Vec<u8> {
        let (tid, commands) = self.signed_commands(client, method, attrs);
        one_reply(commands, client, tid)
    }

    /// Sends the request unauthenticated and learns REALM/NONCE from the 401.
    #[track_caller]
    fn challenge(&mut self, client: &mut Client, method: Method, attrs: &[Attribute<'_>]) {
        let tid = client.tid();
        let bytes = client.build(tid, method, attrs, false);
        let reply = self.transact(client, &bytes, tid);
        let msg = expect_error(&reply, method, 401, None);
        assert_eq!(msg.realm(), Some(REALM));
        let nonce = msg.nonce().expect("401 carries a NONCE");
        assert!(!nonce.is_empty() && nonce.len() <= 128, "{nonce:?}");
        client.nonce = Some(nonce.to_owned());
    }

    /// Allocate with the 401 dance, expect CreateAllocation, bind it, expect the success.
    #[track_caller]
    fn allocate(&mut self, client: &mut Client) -> (AllocationId, SocketAddr) {
        self.allocate_with(client, &[Attribute::RequestedTransport(UDP)])
    }

    #[track_caller]
    fn allocate_with(
        &mut self,
        client: &mut Client,
        attrs: &[Attribute<'_>],
    ) -> (AllocationId, SocketAddr) {
        let (tid, commands) = self.signed_commands(client, Method::ALLOCATE, attrs);
        let (id, relayed) = match commands.as_slice() {
            [Command::CreateAllocation { id, relayed }] => (*id, *relayed),
            other => panic!("expected one CreateAllocation, got {other:?}"),
        };
        self.server.allocation_bound(id, self.now);
        let reply = one_reply(self.drain(), client, tid);
        let msg = expect_success(&reply, Method::ALLOCATE, &client.key);
        assert_eq!(msg.xor_relayed_address(), Some(relayed));
        assert_eq!(msg.xor_mapped_address(), Some(client.addr));
        (id, relayed)
    }

    #[track_caller]
    fn create_permission(&mut self, client: &mut Client, peers: &[SocketAddr]) {
        let attrs: Vec<Attribute<'_>> = peers
            .iter()
            .map(|p| Attribute::XorPeerAddress(*p))
            .collect();
        let reply = self.request(client, Method::CREATE_PERMISSION, &attrs);
        expect_success(&reply, Method::CREATE_PERMISSION, &client.key);
    }

    /// ChannelBind that must succeed; returns the commands besides the response.
    #[track_caller]
    fn channel_bind(
        &mut self,
        client: &mut Client,
        channel: u16,
        peer: SocketAddr,
    ) -> Vec<Command> {
        let attrs = [
            Attribute::ChannelNumber(channel),
            Attribute::XorPeerAddress(peer),
        ];
        let (tid, mut commands) = self.signed_commands(client, Method::CHANNEL_BIND, &attrs);
        let last = commands.pop().expect("a response");
        let reply = one_reply(vec![last], client, tid);
        expect_success(&reply, Method::CHANNEL_BIND, &client.key);
        commands
    }

    #[track_caller]
    fn refresh(&mut self, client: &mut Client, lifetime: Option<u32>) -> Vec<Command> {
        let attrs: Vec<Attribute<'_>> = lifetime.into_iter().map(Attribute::Lifetime).collect();
        let (tid, mut commands) = self.signed_commands(client, Method::REFRESH, &attrs);
        let last = commands.pop().expect("a response");
        let reply = one_reply(vec![last], client, tid);
        let msg = expect_success(&reply, Method::REFRESH, &client.key);
        assert!(msg.lifetime().is_some(), "Refresh success carries LIFETIME");
        commands
    }

    /// ChannelData from the client on `channel`.
    fn channel_data(&mut self, client: &Client, channel: u16, data: &[u8]) -> Vec<Command> {
        let bytes = ChannelData { channel, data }.encode(false);
        self.client_sends(client, &bytes)
    }

    /// A Send indication from the client.
    fn send_indication(
        &mut self,
        client: &mut Client,
        peer: SocketAddr,
        data: &[u8],
    ) -> Vec<Command> {
        let mut b = MessageBuilder::new(Class::Indication, Method::SEND, client.tid());
        b.add(&Attribute::XorPeerAddress(peer))
            .add(&Attribute::Data(data));
        let bytes = b.finish(None, false);
        self.client_sends(client, &bytes)
    }
}

/// A simulated TURN client on one 5-tuple.
struct Client {
    addr: SocketAddr,
    listener: SocketAddr,
    username: String,
    key: LongTermKey,
    nonce: Option<String>,
    next_tid: u64,
}

impl Client {
    fn new(addr: &str, (username, password): (&str, &str)) -> Self {
        Self {
            addr: sa(addr),
            listener: listener(),
            username: username.to_owned(),
            key: LongTermKey::derive(username, REALM, password),
            nonce: None,
            next_tid: 1,
        }
    }

    /// A TURN REST API client: `expiry:user` with `base64(HMAC-SHA1(secret, username))`.
    fn rest(addr: &str, expiry: u64, user: &str) -> Self {
        let username = format!("{expiry}:{user}");
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(REST_SECRET.as_bytes()).expect("hmac");
        mac.update(username.as_bytes());
        let password = STANDARD.encode(mac.finalize().into_bytes());
        Self::new(addr, (username.as_str(), password.as_str()))
    }

    fn tid(&mut self) -> TransactionId {
        let n = self.next_tid;
        self.next_tid += 1;
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&0x7e57_c11e_u32.to_be_bytes());
        id[4..].copy_from_slice(&n.to_be_bytes());
        TransactionId(id)
    }

    /// A request with `attrs`, then (if `auth`) USERNAME, REALM, NONCE and MESSAGE-INTEGRITY,
    /// then FINGERPRINT.
    fn build(
        &self,
        tid: TransactionId,
        method: Method,
        attrs: &[Attribute<'_>],
        auth: bool,
    ) -> Vec<u8> {
        let mut b = MessageBuilder::new(Class::Request, method, tid);
        for a in attrs {
            b.add(a);
        }
        if !auth {
            return b.finish(None, true);
        }
        let nonce = self.nonce.as_deref().expect("nonce learnt from a 401");
        b.add(&Attribute::Username(&self.username))
            .add(&Attribute::Realm(REALM))
            .add(&Attribute::Nonce(nonce));
        b.finish(Some(self.key.as_bytes()), true)
    }
}

/// The only command must be a response to `client` from its listener with transaction `tid`.
#[track_caller]
fn one_reply(commands: Vec<Command>, client: &Client, tid: TransactionId) -> Vec<u8> {
    match commands.as_slice() {
        [Command::SendToClient {
            listener,
            client: to,
            payload,
        }] => {
            assert_eq!(*listener, client.listener, "sent from the listener");
            assert_eq!(*to, client.addr, "sent to the client");
            let msg = Message::decode(payload).expect("the response decodes");
            assert_eq!(
                msg.transaction_id(),
                tid,
                "response echoes the transaction id"
            );
            assert_eq!(
                msg.verify_fingerprint(),
                Some(true),
                "FINGERPRINT present and valid"
            );
            payload.clone()
        }
        other => panic!("expected exactly one response, got {other:?}"),
    }
}

#[track_caller]
fn expect_success<'a>(bytes: &'a [u8], method: Method, key: &LongTermKey) -> Message<'a> {
    let msg = Message::decode(bytes).expect("response decodes");
    assert_eq!(
        (msg.class(), msg.method()),
        (Class::Success, method),
        "error code {:?}",
        msg.error_code()
    );
    assert_eq!(
        msg.verify_integrity(key.as_bytes()),
        Ok(()),
        "signed with the key"
    );
    assert!(msg.username().is_none(), "responses carry no USERNAME");
    msg
}

/// An error response with `code`, signed with `key` or (for `None`) unsigned.
#[track_caller]
fn expect_error<'a>(
    bytes: &'a [u8],
    method: Method,
    code: u16,
    key: Option<&LongTermKey>,
) -> Message<'a> {
    let msg = Message::decode(bytes).expect("response decodes");
    assert_eq!((msg.class(), msg.method()), (Class::Error, method));
    assert_eq!(msg.error_code(), Some(code));
    match key {
        Some(key) => assert_eq!(msg.verify_integrity(key.as_bytes()), Ok(())),
        None => assert!(
            !msg.has_integrity() && !msg.has_integrity_sha256(),
            "unauthenticated errors are unsigned"
        ),
    }
    assert!(msg.username().is_none(), "responses carry no USERNAME");
    msg
}

/// A TURN 400/4xx error reply to a signed request.
#[track_caller]
fn expect_signed_error(bytes: &[u8], method: Method, code: u16, client: &Client) {
    expect_error(bytes, method, code, Some(&client.key));
}

fn to_peer(relayed: SocketAddr, peer: SocketAddr, payload: &[u8]) -> Command {
    Command::SendToPeer {
        relayed,
        peer,
        payload: payload.to_vec(),
    }
}

fn to_client(client: &Client, payload: Vec<u8>) -> Command {
    Command::SendToClient {
        listener: client.listener,
        client: client.addr,
        payload,
    }
}

fn create_binding(
    id: AllocationId,
    client: &Client,
    relayed: SocketAddr,
    peer: SocketAddr,
    channel: u16,
    expires_at: Instant,
) -> Command {
    Command::CreateChannelBinding {
        id,
        client: client.addr,
        listener: client.listener,
        relayed,
        peer,
        channel,
        expires_at,
    }
}

fn delete_binding(
    id: AllocationId,
    client: &Client,
    relayed: SocketAddr,
    peer: SocketAddr,
    channel: u16,
) -> Command {
    Command::DeleteChannelBinding {
        id,
        client: client.addr,
        listener: client.listener,
        relayed,
        peer,
        channel,
    }
}

/// Decodes a Data indication for `peer` and returns its DATA.
#[track_caller]
fn data_indication(commands: &[Command], client: &Client, peer: SocketAddr) -> Vec<u8> {
    match commands {
        [Command::SendToClient {
            listener,
            client: to,
            payload,
        }] => {
            assert_eq!((*listener, *to), (client.listener, client.addr));
            let msg = Message::decode(payload).expect("Data indication decodes");
            assert_eq!(
                (msg.class(), msg.method()),
                (Class::Indication, Method::DATA)
            );
            assert_eq!(msg.xor_peer_addresses().collect::<Vec<_>>(), vec![peer]);
            assert!(!msg.has_integrity(), "indications are not signed");
            msg.data().expect("DATA").to_vec()
        }
        other => panic!("expected one Data indication, got {other:?}"),
    }
}

// ---- Binding ----

/// RFC 8489 §6.3.1: XOR-MAPPED-ADDRESS of the source, FINGERPRINT, no authentication.
#[test]
fn binding_reflects_source_address() {
    let mut h = Harness::new();
    for addr in ["192.0.2.10:50000", "[2001:db8:1::5]:61000"] {
        let mut c = Client::new(addr, ALICE);
        let tid = c.tid();
        // No FINGERPRINT in the request: the Binding response has one anyway.
        let bytes = MessageBuilder::new(Class::Request, Method::BINDING, tid).finish(None, false);
        let reply = h.transact(&c, &bytes, tid);
        let msg = Message::decode(&reply).expect("decodes");
        assert_eq!(
            (msg.class(), msg.method()),
            (Class::Success, Method::BINDING)
        );
        assert_eq!(msg.xor_mapped_address(), Some(c.addr));
        assert!(!msg.has_integrity());
        assert!(msg.has_fingerprint());
    }
}

/// RFC 8489 §6.3.1.1: an unknown comprehension-required attribute draws 420 listing it.
#[test]
fn binding_with_unknown_required_attribute_is_420() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let tid = c.tid();
    let mut b = MessageBuilder::new(Class::Request, Method::BINDING, tid);
    b.add_raw(0x0077, b"????").add_raw(0x8077, b"optional");
    let reply = h.transact(&c, &b.finish(None, true), tid);
    let msg = expect_error(&reply, Method::BINDING, 420, None);
    assert!(msg
        .attributes()
        .contains(&Attribute::UnknownAttributes(vec![0x0077])));
}

// ---- Allocate ----

/// RFC 8656 §7.2: 401 with REALM and NONCE, then the signed request makes the server ask for a
/// socket; the success waits for `allocation_bound` and carries both addresses and LIFETIME.
#[test]
fn allocate_challenge_then_success() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);

    let tid = c.tid();
    let bytes = c.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        false,
    );
    let reply = h.transact(&c, &bytes, tid);
    let msg = expect_error(&reply, Method::ALLOCATE, 401, None);
    assert_eq!(msg.realm(), Some(REALM));
    c.nonce = Some(msg.nonce().expect("nonce").to_owned());
    assert!(h.server.allocations().next().is_none());

    let tid = c.tid();
    let bytes = c.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        true,
    );
    let commands = h.client_sends(&c, &bytes);
    let (id, relayed) = match commands.as_slice() {
        [Command::CreateAllocation { id, relayed }] => (*id, *relayed),
        other => panic!("expected CreateAllocation, got {other:?}"),
    };
    assert_eq!(relayed.ip(), relay_v4());
    assert!((49152..=65535).contains(&relayed.port()));
    // Still binding: not listed, nothing sent yet.
    assert!(h.server.allocations().next().is_none());

    h.advance(secs(1));
    let bound_at = h.now;
    h.server.allocation_bound(id, h.now);
    let reply = one_reply(h.drain(), &c, tid);
    let msg = expect_success(&reply, Method::ALLOCATE, &c.key);
    assert_eq!(msg.xor_relayed_address(), Some(relayed));
    assert_eq!(msg.xor_mapped_address(), Some(c.addr));
    assert_eq!(msg.lifetime(), Some(600));
    assert!(!msg.has(attr_type::ADDRESS_ERROR_CODE));

    let infos: Vec<_> = h.server.allocations().collect();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].id, id);
    assert_eq!(infos[0].username, ALICE.0);
    assert_eq!((infos[0].client, infos[0].listener), (c.addr, c.listener));
    assert_eq!(infos[0].relayed, relayed);
    // The lifetime runs from the moment the socket is bound.
    assert_eq!(infos[0].expires, bound_at + secs(600));
    assert_eq!(h.server.poll_timeout(), Some(bound_at + secs(600)));
    // A duplicate bind notification changes nothing.
    h.server.allocation_bound(id, h.now);
    assert!(h.drain().is_empty());
}

/// RFC 8656 §7.2 step 7: min(requested, max), never below the default.
#[test]
fn allocate_lifetime_capped_and_floored() {
    let mut h = Harness::new();
    for (i, (requested, granted)) in [(7200u32, 3600u32), (60, 600), (1800, 1800), (0, 600)]
        .into_iter()
        .enumerate()
    {
        let mut c = Client::new(&format!("192.0.2.{}:50000", 10 + i), ALICE);
        let attrs = [
            Attribute::RequestedTransport(UDP),
            Attribute::Lifetime(requested),
        ];
        let (tid, commands) = h.signed_commands(&mut c, Method::ALLOCATE, &attrs);
        let Some(Command::CreateAllocation { id, .. }) = commands.first().cloned() else {
            panic!("expected CreateAllocation, got {commands:?}");
        };
        h.server.allocation_bound(id, h.now);
        let reply = one_reply(h.drain(), &c, tid);
        let msg = expect_success(&reply, Method::ALLOCATE, &c.key);
        assert_eq!(msg.lifetime(), Some(granted), "requested {requested}");
    }
}

/// A failed relay socket bind is retried on another port; after MAX_BIND_ATTEMPTS the client
/// gets 508 and the allocation is gone.
#[test]
fn allocate_bind_failure_retries_then_508() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (tid, commands) = h.signed_commands(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let [Command::CreateAllocation { id, relayed }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    let id = *id;
    let mut tried = vec![*relayed];
    for _ in 1..MAX_BIND_ATTEMPTS {
        h.server.allocation_bind_failed(id, h.now);
        match h.drain().as_slice() {
            [Command::CreateAllocation { id: again, relayed }] => {
                assert_eq!(*again, id, "same allocation, new port");
                assert_eq!(relayed.ip(), relay_v4());
                assert!(!tried.contains(relayed), "{relayed} was tried already");
                tried.push(*relayed);
            }
            other => panic!("expected a retry, got {other:?}"),
        }
    }
    h.server.allocation_bind_failed(id, h.now);
    let reply = one_reply(h.drain(), &c, tid);
    expect_signed_error(&reply, Method::ALLOCATE, 508, &c);
    assert_eq!(h.server.poll_timeout(), None, "nothing left");
    // Late notifications for the dead allocation are ignored.
    h.server.allocation_bound(id, h.now);
    h.server.allocation_bind_failed(id, h.now);
    assert!(h.drain().is_empty());
    // The 5-tuple is free again.
    h.allocate(&mut c);
}

/// With a two-port range, the retry after a failed bind must go to the other port rather than
/// straight back to the one that just failed.
#[test]
fn allocate_bind_retry_avoids_the_failed_port() {
    for seed in 0..32 {
        let mut h = Harness::with_seed(seed, |cfg| cfg.port_range = 50000..=50001);
        let mut c = Client::new("192.0.2.10:50000", ALICE);
        let (tid, commands) = h.signed_commands(
            &mut c,
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(UDP)],
        );
        let [Command::CreateAllocation { id, relayed: first }] = commands.as_slice() else {
            panic!("expected CreateAllocation, got {commands:?}");
        };
        h.server.allocation_bind_failed(*id, h.now);
        match h.drain().as_slice() {
            [Command::CreateAllocation { relayed, .. }] => {
                assert_ne!(relayed, first, "seed {seed}: retried the failed port")
            }
            other => panic!("expected a retry, got {other:?}"),
        }
        // Both ports failed: nothing left to try, 508 right away.
        h.server.allocation_bind_failed(*id, h.now);
        let reply = one_reply(h.drain(), &c, tid);
        expect_signed_error(&reply, Method::ALLOCATE, 508, &c);
    }
}

/// RFC 8656 §7.2: a retransmitted Allocate gets the very same success; a new Allocate on the
/// 5-tuple gets 437.
#[test]
fn allocate_retransmission_and_mismatch() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.challenge(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let tid = c.tid();
    let bytes = c.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        true,
    );
    let commands = h.client_sends(&c, &bytes);
    let [Command::CreateAllocation { id, .. }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    // Retransmission while the socket is being bound: the answer is still to come.
    assert!(h.client_sends(&c, &bytes).is_empty());
    h.server.allocation_bound(*id, h.now);
    let first = one_reply(h.drain(), &c, tid);
    expect_success(&first, Method::ALLOCATE, &c.key);

    h.advance(secs(2));
    let again = h.transact(&c, &bytes, tid);
    assert_eq!(again, first, "identical response to the retransmission");

    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 437, &c);
    assert_eq!(h.server.allocations().count(), 1);
}

/// RFC 8656 §7.2 step 3: REQUESTED-TRANSPORT missing → 400, not UDP → 442.
#[test]
fn allocate_transport_checks() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let reply = h.request(&mut c, Method::ALLOCATE, &[Attribute::Lifetime(600)]);
    expect_signed_error(&reply, Method::ALLOCATE, 400, &c);
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(TCP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 442, &c);
    assert!(h.server.allocations().next().is_none());
    assert_eq!(h.server.poll_timeout(), None);
}

/// RFC 8656 §7.2 step 6: REQUESTED-ADDRESS-FAMILY / ADDITIONAL-ADDRESS-FAMILY.
#[test]
fn allocate_address_families() {
    let v6_attrs = [
        Attribute::RequestedTransport(UDP),
        Attribute::RequestedAddressFamily(AddressFamily::V6),
    ];
    // No IPv6 relay address: 440.
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let reply = h.request(&mut c, Method::ALLOCATE, &v6_attrs);
    expect_signed_error(&reply, Method::ALLOCATE, 440, &c);
    // Both family attributes: 400.
    let both = [
        Attribute::RequestedTransport(UDP),
        Attribute::RequestedAddressFamily(AddressFamily::V4),
        Attribute::AdditionalAddressFamily(AddressFamily::V6),
    ];
    let reply = h.request(&mut c, Method::ALLOCATE, &both);
    expect_signed_error(&reply, Method::ALLOCATE, 400, &c);
    // Dual allocation asked for, IPv6 part refused with ADDRESS-ERROR-CODE 440.
    let dual = [
        Attribute::RequestedTransport(UDP),
        Attribute::AdditionalAddressFamily(AddressFamily::V6),
    ];
    let (tid, commands) = h.signed_commands(&mut c, Method::ALLOCATE, &dual);
    let [Command::CreateAllocation { id, relayed }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    assert!(relayed.is_ipv4());
    h.server.allocation_bound(*id, h.now);
    let reply = one_reply(h.drain(), &c, tid);
    let msg = expect_success(&reply, Method::ALLOCATE, &c.key);
    assert!(msg.attributes().contains(&Attribute::AddressErrorCode {
        family: AddressFamily::V6,
        error: ErrorCode {
            code: 440,
            reason: "Address Family not Supported",
        },
    }));

    // With an IPv6 relay address: an IPv6 relayed address.
    let mut h = Harness::with_config(|cfg| cfg.relay_ips = vec![relay_v4(), relay_v6()]);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate_with(&mut c, &v6_attrs);
    assert_eq!(relayed.ip(), relay_v6());
    // RFC 8656 §10.2/§12.2: peers of the other family → 443.
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 443, &c);
    h.create_permission(&mut c, &[peer_v6()]);
    assert_eq!(
        h.send_indication(&mut c, peer_v6(), b"v6"),
        vec![to_peer(relayed, peer_v6(), b"v6")]
    );
    // RFC 8656 §8: a Refresh naming the other family → 443.
    let reply = h.request(
        &mut c,
        Method::REFRESH,
        &[Attribute::RequestedAddressFamily(AddressFamily::V4)],
    );
    expect_signed_error(&reply, Method::REFRESH, 443, &c);
}

/// EVEN-PORT with R=0 gets an even port; R=1 and RESERVATION-TOKEN need reservations, which
/// this server does not make → 508 (RFC 8656 §7.2 steps 5 and 7).
#[test]
fn allocate_even_port_and_reservations() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::EvenPort(true),
        ],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 508, &c);
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::ReservationToken([1; 8]),
        ],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 508, &c);
    let (_, relayed) = h.allocate_with(
        &mut c,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::EvenPort(false),
        ],
    );
    assert_eq!(relayed.port() % 2, 0);
}

/// RFC 8656 §7.2 step 8: per-user quota → 486; total capacity → 508. Freed slots are reusable.
#[test]
fn allocate_quotas() {
    let mut h = Harness::with_config(|cfg| {
        cfg.max_allocations_per_user = 2;
        cfg.max_allocations = 3;
    });
    let mut a1 = Client::new("192.0.2.10:50000", ALICE);
    let mut a2 = Client::new("192.0.2.10:50001", ALICE);
    let mut a3 = Client::new("192.0.2.10:50002", ALICE);
    h.allocate(&mut a1);
    h.allocate(&mut a2);
    let reply = h.request(
        &mut a3,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 486, &a3);

    let mut b1 = Client::new("192.0.2.20:50000", BOB);
    let mut b2 = Client::new("192.0.2.20:50001", BOB);
    h.allocate(&mut b1);
    let reply = h.request(
        &mut b2,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 508, &b2);

    // Deleting one of alice's allocations frees both her quota and the capacity.
    let commands = h.refresh(&mut a1, Some(0));
    assert!(matches!(
        commands.as_slice(),
        [Command::DeleteAllocation { .. }]
    ));
    h.allocate(&mut a3);
}

/// RFC 8489 §9.2.4: wrong password or unknown user → 401 with a fresh NONCE, unsigned.
#[test]
fn wrong_password_is_401() {
    let mut h = Harness::new();
    for creds in [(ALICE.0, "not-the-password"), ("mallory", "whatever")] {
        let mut c = Client::new("192.0.2.10:50000", creds);
        h.challenge(
            &mut c,
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(UDP)],
        );
        let tid = c.tid();
        let bytes = c.build(
            tid,
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(UDP)],
            true,
        );
        let reply = h.transact(&c, &bytes, tid);
        let msg = expect_error(&reply, Method::ALLOCATE, 401, None);
        assert_eq!(msg.realm(), Some(REALM));
        assert!(msg.nonce().is_some());
    }
    assert!(h.server.allocations().next().is_none());
}

/// MESSAGE-INTEGRITY present but USERNAME/REALM/NONCE missing → 400 (RFC 8489 §9.2.4).
#[test]
fn integrity_without_username_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let tid = c.tid();
    let mut b = MessageBuilder::new(Class::Request, Method::ALLOCATE, tid);
    b.add(&Attribute::RequestedTransport(UDP));
    let bytes = b.finish(Some(c.key.as_bytes()), true);
    let reply = h.transact(&c, &bytes, tid);
    expect_error(&reply, Method::ALLOCATE, 400, None);
}

/// RFC 8489 §9.2.4: a nonce past its lifetime → 438 with REALM and a new NONCE (signed, which
/// §9.2.4 allows); the retry with the new nonce succeeds.
#[test]
fn stale_nonce_is_438_with_new_nonce() {
    let mut h = Harness::with_config(|cfg| cfg.nonce_lifetime = secs(60));
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.challenge(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let old = c.nonce.clone().expect("nonce");
    h.advance(secs(61));
    let tid = c.tid();
    let bytes = c.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        true,
    );
    let reply = h.transact(&c, &bytes, tid);
    let msg = expect_error(&reply, Method::ALLOCATE, 438, Some(&c.key));
    assert_eq!(msg.realm(), Some(REALM));
    let fresh = msg.nonce().expect("438 carries a NONCE").to_owned();
    assert_ne!(fresh, old);
    assert!(h.server.allocations().next().is_none());

    c.nonce = Some(fresh);
    h.allocate(&mut c);
    // A nonce that was issued to another 5-tuple is not valid here either.
    let mut other = Client::new("192.0.2.10:50001", ALICE);
    other.nonce = c.nonce.clone();
    let tid = other.tid();
    let bytes = other.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        true,
    );
    let reply = h.transact(&other, &bytes, tid);
    expect_error(&reply, Method::ALLOCATE, 438, Some(&other.key));
}

/// TURN REST API credentials: accepted before their expiry, refused (401) after it, including
/// for an allocation that already exists when the wall clock passes the expiry.
#[test]
fn rest_credentials() {
    let mut h = Harness::new();
    let mut ok = Client::rest("192.0.2.10:50000", UNIX_NOW + 3600, "carol");
    let (_, relayed) = h.allocate(&mut ok);
    h.create_permission(&mut ok, &[peer1()]);
    assert_eq!(
        h.send_indication(&mut ok, peer1(), b"rest"),
        vec![to_peer(relayed, peer1(), b"rest")]
    );
    assert_eq!(
        h.server.allocations().next().map(|a| a.username),
        Some(ok.username.clone())
    );

    let mut expired = Client::rest("192.0.2.11:50000", UNIX_NOW - 1, "carol");
    h.challenge(
        &mut expired,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let tid = expired.tid();
    let bytes = expired.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        true,
    );
    let reply = h.transact(&expired, &bytes, tid);
    expect_error(&reply, Method::ALLOCATE, 401, None);

    // A REST password computed with another secret is refused.
    let mut forged = Client::new("192.0.2.12:50000", (ok.username.as_str(), "Zm9yZ2Vk"));
    h.challenge(
        &mut forged,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let tid = forged.tid();
    let bytes = forged.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        true,
    );
    expect_error(
        &h.transact(&forged, &bytes, tid),
        Method::ALLOCATE,
        401,
        None,
    );

    // Once the credential expires, the existing allocation can no longer be refreshed.
    h.server.set_unix_time(UNIX_NOW + 3600);
    let tid = ok.tid();
    let bytes = ok.build(tid, Method::REFRESH, &[Attribute::Lifetime(600)], true);
    expect_error(&h.transact(&ok, &bytes, tid), Method::REFRESH, 401, None);
}

/// RFC 8489 §6.3.1.1: unknown comprehension-required attributes → 420 with UNKNOWN-ATTRIBUTES,
/// signed; unknown comprehension-optional ones are ignored.
#[test]
fn unknown_required_attribute_is_420() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let attrs = [
        Attribute::RequestedTransport(UDP),
        Attribute::Unknown {
            typ: 0x0041,
            value: b"x",
        },
        Attribute::Unknown {
            typ: 0x7fff,
            value: b"",
        },
    ];
    let reply = h.request(&mut c, Method::ALLOCATE, &attrs);
    let msg = expect_error(&reply, Method::ALLOCATE, 420, Some(&c.key));
    assert!(msg
        .attributes()
        .contains(&Attribute::UnknownAttributes(vec![0x0041, 0x7fff])));
    assert!(h.server.allocations().next().is_none());

    let optional = [
        Attribute::RequestedTransport(UDP),
        Attribute::Unknown {
            typ: 0xc0de,
            value: b"ignored",
        },
    ];
    h.allocate_with(&mut c, &optional);
}

/// RFC 8656 §5: a non-Allocate request on the 5-tuple with another user's credentials → 441;
/// an Allocate there → 437 (the 5-tuple is taken).
#[test]
fn other_user_on_five_tuple() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut alice);
    let mut bob = Client::new("192.0.2.10:50000", BOB);
    for (method, attrs) in [
        (Method::REFRESH, vec![Attribute::Lifetime(0)]),
        (
            Method::CREATE_PERMISSION,
            vec![Attribute::XorPeerAddress(peer1())],
        ),
        (
            Method::CHANNEL_BIND,
            vec![
                Attribute::ChannelNumber(0x4000),
                Attribute::XorPeerAddress(peer1()),
            ],
        ),
    ] {
        let reply = h.request(&mut bob, method, &attrs);
        expect_signed_error(&reply, method, 441, &bob);
    }
    let reply = h.request(
        &mut bob,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 437, &bob);
    // Alice's allocation is untouched: no permission, no channel, still there.
    let info = h.server.allocations().next().expect("still allocated");
    assert_eq!((info.id, info.relayed), (id, relayed));
    assert!(info.permissions.is_empty() && info.channels.is_empty());
}

/// MESSAGE-INTEGRITY-SHA256 requests get MESSAGE-INTEGRITY-SHA256 responses.
#[test]
fn sha256_integrity_round_trip() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.challenge(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let tid = c.tid();
    let mut b = MessageBuilder::new(Class::Request, Method::ALLOCATE, tid);
    b.add(&Attribute::RequestedTransport(UDP))
        .add(&Attribute::Username(ALICE.0))
        .add(&Attribute::Realm(REALM))
        .add(&Attribute::Nonce(c.nonce.as_deref().expect("nonce")));
    let bytes = b.finish_with(Some(Integrity::Sha256(c.key.as_bytes())), true);
    let commands = h.client_sends(&c, &bytes);
    let [Command::CreateAllocation { id, .. }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    h.server.allocation_bound(*id, h.now);
    let reply = one_reply(h.drain(), &c, tid);
    let msg = Message::decode(&reply).expect("decodes");
    assert_eq!(msg.class(), Class::Success);
    assert!(!msg.has_integrity());
    assert_eq!(msg.verify_integrity_sha256(c.key.as_bytes()), Ok(()));
}

// ---- Refresh ----

/// RFC 8656 §8: Refresh extends the lifetime; LIFETIME 0 deletes the allocation (channels leave
/// the fast path first); afterwards Refresh gets 437.
#[test]
fn refresh_extends_and_deletes() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let t0 = h.now;
    let (id, relayed) = h.allocate(&mut c);
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(600)));

    h.advance(secs(500));
    let reply = h.request(&mut c, Method::REFRESH, &[Attribute::Lifetime(1200)]);
    let msg = expect_success(&reply, Method::REFRESH, &c.key);
    assert_eq!(msg.lifetime(), Some(1200));
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(1700)));
    // Without LIFETIME: the default; above the maximum: the maximum.
    let reply = h.request(&mut c, Method::REFRESH, &[]);
    assert_eq!(
        expect_success(&reply, Method::REFRESH, &c.key).lifetime(),
        Some(600)
    );
    let reply = h.request(&mut c, Method::REFRESH, &[Attribute::Lifetime(u32::MAX)]);
    assert_eq!(
        expect_success(&reply, Method::REFRESH, &c.key).lifetime(),
        Some(3600)
    );
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(500 + 3600)));

    // Past the original expiry nothing happens.
    h.advance(secs(200));
    assert!(h.tick().is_empty());

    // Two channels, one of which already left the fast path with its permission.
    h.channel_bind(&mut c, 0x4000, peer1());
    h.advance(secs(100));
    h.channel_bind(&mut c, 0x4001, peer2());
    h.advance(secs(250));
    // peer1's permission (installed at +700 s) expires at +1000 s.
    assert_eq!(
        h.tick(),
        vec![delete_binding(id, &c, relayed, peer1(), 0x4000)]
    );

    let commands = h.refresh(&mut c, Some(0));
    assert_eq!(
        commands,
        vec![
            delete_binding(id, &c, relayed, peer2(), 0x4001),
            Command::DeleteAllocation { id, relayed },
        ]
    );
    assert!(h.server.allocations().next().is_none());
    assert_eq!(h.server.poll_timeout(), None);
    // Traffic for the deleted allocation goes nowhere.
    assert!(h.peer_sends(relayed, peer2(), b"late").is_empty());
    assert!(h.channel_data(&c, 0x4001, b"late").is_empty());

    let reply = h.request(&mut c, Method::REFRESH, &[Attribute::Lifetime(600)]);
    expect_signed_error(&reply, Method::REFRESH, 437, &c);
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 437, &c);
}

/// Refresh, CreatePermission and ChannelBind without an allocation → 437 (RFC 8656 §5).
#[test]
fn requests_without_allocation_are_437() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let reply = h.request(&mut c, Method::REFRESH, &[Attribute::Lifetime(600)]);
    expect_signed_error(&reply, Method::REFRESH, 437, &c);
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 437, &c);
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer1()),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 437, &c);
    // Indications and ChannelData without an allocation are silently dropped.
    assert!(h.send_indication(&mut c, peer1(), b"x").is_empty());
    assert!(h.channel_data(&c, 0x4000, b"x").is_empty());
}

// ---- CreatePermission, Send and Data indications ----

/// RFC 8656 §10, §11: a permission lets Send indications out and peer data in (as Data
/// indications while no channel is bound); other peers stay blocked.
#[test]
fn permission_send_and_data_indications() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);

    // No permission yet: nothing goes either way.
    assert!(h.send_indication(&mut c, peer1(), b"hello").is_empty());
    assert!(h.peer_sends(relayed, peer1(), b"hi").is_empty());

    h.create_permission(&mut c, &[peer1()]);
    assert_eq!(
        h.server.allocations().next().map(|a| a.permissions),
        Some(vec![peer1().ip()])
    );
    assert_eq!(
        h.send_indication(&mut c, peer1(), b"hello"),
        vec![to_peer(relayed, peer1(), b"hello")]
    );
    // Permissions are per IP: any port of that peer may send and be sent to.
    let other_port = SocketAddr::new(peer1().ip(), 9999);
    assert_eq!(
        h.send_indication(&mut c, other_port, b"p"),
        vec![to_peer(relayed, other_port, b"p")]
    );
    let commands = h.peer_sends(relayed, other_port, b"from peer");
    assert_eq!(data_indication(&commands, &c, other_port), b"from peer");
    // Empty payloads are relayed too.
    let commands = h.peer_sends(relayed, peer1(), b"");
    assert_eq!(data_indication(&commands, &c, peer1()), b"");

    // Other peer IPs, and other relayed addresses, are not.
    assert!(h.send_indication(&mut c, peer2(), b"x").is_empty());
    assert!(h.peer_sends(relayed, peer2(), b"x").is_empty());
    let wrong_relayed = SocketAddr::new(relayed.ip(), relayed.port().wrapping_add(1));
    assert!(h.peer_sends(wrong_relayed, peer1(), b"x").is_empty());
    // A Send indication from another 5-tuple is dropped.
    let mut stranger = Client::new("192.0.2.99:50000", ALICE);
    assert!(h.send_indication(&mut stranger, peer1(), b"x").is_empty());
    // A Send indication without DATA is dropped.
    let mut b = MessageBuilder::new(Class::Indication, Method::SEND, c.tid());
    b.add(&Attribute::XorPeerAddress(peer1()));
    assert!(h.client_sends(&c, &b.finish(None, false)).is_empty());
    // So is one with an unknown comprehension-required attribute.
    let mut b = MessageBuilder::new(Class::Indication, Method::SEND, c.tid());
    b.add(&Attribute::XorPeerAddress(peer1()))
        .add(&Attribute::Data(b"x"))
        .add_raw(0x0042, b"");
    assert!(h.client_sends(&c, &b.finish(None, false)).is_empty());
}

/// Several peers in one CreatePermission are installed together.
#[test]
fn create_permission_multiple_peers() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);
    h.create_permission(&mut c, &[peer1(), peer2()]);
    for p in [peer1(), peer2()] {
        assert_eq!(
            h.send_indication(&mut c, p, b"m"),
            vec![to_peer(relayed, p, b"m")]
        );
    }
}

/// The fast path hears of every permission (RFC 8656 §9): installed by CreatePermission and
/// by ChannelBind, refreshed with a new deadline (never past the allocation's), deleted when
/// it expires.
#[test]
fn permission_commands_follow_the_permissions() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    let t0 = h.now;
    let (client, listener) = (c.addr, c.listener);
    let create = move |peer: SocketAddr, expires_at: Instant| Command::CreatePermission {
        id,
        client,
        listener,
        relayed,
        peer_ip: peer.ip(),
        expires_at,
    };
    h.create_permission(&mut c, &[peer1()]);
    assert_eq!(h.permissions, [create(peer1(), t0 + secs(300))]);
    h.permissions.clear();
    h.advance(secs(10));
    h.channel_bind(&mut c, 0x4000, peer2());
    assert_eq!(h.permissions, [create(peer2(), t0 + secs(310))]);
    h.permissions.clear();
    // An allocation refresh re-announces every permission (its deadline may have moved).
    h.refresh(&mut c, Some(600));
    let mut announced = h.permissions.clone();
    announced.sort_by_key(|c| format!("{c:?}"));
    let mut expected = vec![
        create(peer1(), t0 + secs(300)),
        create(peer2(), t0 + secs(310)),
    ];
    expected.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(announced, expected);
    h.permissions.clear();
    // Expiry deletes them.
    h.advance(secs(290));
    h.tick();
    assert_eq!(
        h.permissions,
        [Command::DeletePermission {
            id,
            relayed,
            peer_ip: peer1().ip(),
        }]
    );
}

/// Client-to-client through the relay: a permission for the relay's address is per IP
/// (RFC 8656 §9) and allowed, but only live relayed transport addresses are destinations; any
/// other port of the relay's address (a service on the host) gets 403 on ChannelBind and its
/// Send indications are dropped.
#[test]
fn relay_address_is_a_peer_only_at_live_relayed_ports() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.10:50000", ALICE);
    let mut bob = Client::new("192.0.2.11:50000", BOB);
    let (_, relayed_a) = h.allocate(&mut alice);
    let (_, relayed_b) = h.allocate(&mut bob);
    assert_eq!(relayed_b.ip(), relay_v4());
    h.create_permission(&mut alice, &[listener()]);
    for service in [listener(), sa("203.0.113.1:22")] {
        let reply = h.request(
            &mut alice,
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(0x4000),
                Attribute::XorPeerAddress(service),
            ],
        );
        expect_signed_error(&reply, Method::CHANNEL_BIND, 403, &alice);
        assert!(h.send_indication(&mut alice, service, b"x").is_empty());
    }
    // Bob's relayed address is a peer like any other.
    h.channel_bind(&mut alice, 0x4001, relayed_b);
    let sent = h.send_indication(&mut alice, relayed_b, b"hi bob");
    assert!(
        matches!(sent.as_slice(), [Command::SendToPeer { relayed, peer, .. }]
            if *relayed == relayed_a && *peer == relayed_b),
        "{sent:?}"
    );
    let sent = h.channel_data(&alice, 0x4001, b"hi again");
    assert!(
        matches!(sent.as_slice(), [Command::SendToPeer { .. }]),
        "{sent:?}"
    );
    // Once Bob's allocation is gone, its port is just another port of the host.
    h.refresh(&mut bob, Some(0));
    assert!(h.send_indication(&mut alice, relayed_b, b"gone").is_empty());
    assert!(h.channel_data(&alice, 0x4001, b"gone").is_empty());
}

/// An address the host gains at runtime stops being a destination at once, even for a
/// permission and a channel created before.
#[test]
fn a_new_host_address_is_no_longer_a_destination() {
    let mut host = None;
    let mut h = Harness::with_config(|cfg| host = Some(cfg.policy.host_addresses().clone()));
    let host = host.expect("the policy's host addresses");
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut c);
    let target = sa("203.0.113.77:9");
    h.create_permission(&mut c, &[target]);
    h.channel_bind(&mut c, 0x4000, target);
    assert_eq!(h.send_indication(&mut c, target, b"before").len(), 1);
    host.replace([ip("203.0.113.77")]);
    assert!(h.send_indication(&mut c, target, b"after").is_empty());
    assert!(h.channel_data(&c, 0x4000, b"after").is_empty());
}

/// An operator's explicit deny covers the relay's own address too.
#[test]
fn denied_relay_address_is_403() {
    let mut h = Harness::with_config(|cfg| {
        cfg.policy.deny("203.0.113.1/32".parse().expect("cidr"));
    });
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut c);
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(listener())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 403, &c);
}

/// Peer policy (architecture "Safety defaults", RFC 8656 §21): 403, and all-or-nothing.
#[test]
fn create_permission_policy_denied_is_403() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut c);
    for denied in [
        "127.0.0.1:80",
        "10.1.2.3:80",
        "169.254.169.254:80",
        "192.168.0.1:80",
        "100.64.0.1:80",
        "224.0.0.1:80",
        "0.0.0.0:80",
        "255.255.255.255:80",
    ] {
        let reply = h.request(
            &mut c,
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(sa(denied))],
        );
        expect_signed_error(&reply, Method::CREATE_PERMISSION, 403, &c);
        let reply = h.request(
            &mut c,
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(0x4000),
                Attribute::XorPeerAddress(sa(denied)),
            ],
        );
        expect_signed_error(&reply, Method::CHANNEL_BIND, 403, &c);
    }
    // The allowed neighbour of the relay address is fine.
    h.create_permission(&mut c, &[sa("203.0.113.50:9")]);
    // One denied peer spoils the whole request.
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[
            Attribute::XorPeerAddress(peer1()),
            Attribute::XorPeerAddress(sa("127.0.0.1:1")),
        ],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 403, &c);
    assert!(h.send_indication(&mut c, peer1(), b"x").is_empty());
    // An IPv6 peer on an IPv4 allocation is a family mismatch, checked first.
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(sa("[::1]:1"))],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 443, &c);
    assert_eq!(
        h.server.allocations().next().map(|a| a.permissions),
        Some(vec![ip("203.0.113.50")])
    );
}

/// Permissions per allocation are capped (508); refreshing an existing one still works;
/// CreatePermission without XOR-PEER-ADDRESS → 400.
#[test]
fn create_permission_cap_and_missing_peer() {
    let mut h = Harness::with_config(|cfg| cfg.max_permissions_per_allocation = 2);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);
    let reply = h.request(&mut c, Method::CREATE_PERMISSION, &[]);
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 400, &c);

    h.create_permission(&mut c, &[peer1()]);
    // Two new ones with one slot left: refused as a whole.
    let p3 = sa("8.8.8.8:53");
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[
            Attribute::XorPeerAddress(peer2()),
            Attribute::XorPeerAddress(p3),
        ],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 508, &c);
    assert!(h.send_indication(&mut c, peer2(), b"x").is_empty());

    h.create_permission(&mut c, &[peer2()]);
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(p3)],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 508, &c);
    // ChannelBind to a third IP needs a permission slot too.
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(p3),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 508, &c);
    // Refreshing existing permissions (same IP, any port) is not capped.
    h.create_permission(&mut c, &[peer1(), SocketAddr::new(peer2().ip(), 1)]);
    h.channel_bind(&mut c, 0x4000, peer1());
    // Once one expires, the slot is free again.
    h.advance(secs(301));
    h.tick();
    h.create_permission(&mut c, &[p3]);
    assert_eq!(
        h.send_indication(&mut c, p3, b"y"),
        vec![to_peer(relayed, p3, b"y")]
    );
}

// ---- ChannelBind and ChannelData ----

/// RFC 8656 §12.2: success announces the channel to the fast path with the earlier of the
/// channel (600 s) and permission (300 s) deadlines; ChannelData flows both ways.
#[test]
fn channel_bind_and_channel_data() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    let t = h.now;
    let commands = h.channel_bind(&mut c, 0x4000, peer1());
    assert_eq!(
        commands,
        vec![create_binding(
            id,
            &c,
            relayed,
            peer1(),
            0x4000,
            t + secs(300)
        )]
    );
    let info = h.server.allocations().next().expect("allocation");
    assert_eq!(info.channels, vec![(0x4000, peer1())]);
    assert_eq!(info.permissions, vec![peer1().ip()]);

    // Client → peer, with 0 to 3 bytes of padding tolerated (RFC 8656 §12.5).
    for pad in 0..=3usize {
        let mut bytes = ChannelData {
            channel: 0x4000,
            data: b"abc",
        }
        .encode(false);
        bytes.extend(std::iter::repeat_n(0u8, pad));
        assert_eq!(
            h.client_sends(&c, &bytes),
            vec![to_peer(relayed, peer1(), b"abc")],
            "padding {pad}"
        );
    }
    // Four trailing bytes are not padding; a length past the end is not ChannelData.
    let mut bytes = ChannelData {
        channel: 0x4000,
        data: b"abc",
    }
    .encode(false);
    bytes.extend([0u8; 4]);
    assert!(h.client_sends(&c, &bytes).is_empty());
    assert!(h
        .client_sends(&c, &[0x40, 0x00, 0x00, 0x08, 1, 2])
        .is_empty());
    // Empty ChannelData is relayed as an empty datagram.
    assert_eq!(
        h.channel_data(&c, 0x4000, b""),
        vec![to_peer(relayed, peer1(), b"")]
    );

    // Peer → client as ChannelData.
    assert_eq!(
        h.peer_sends(relayed, peer1(), b"pong"),
        vec![to_client(
            &c,
            vec![0x40, 0x00, 0x00, 0x04, b'p', b'o', b'n', b'g']
        )]
    );
    // Same peer IP, other port: no channel for that transport address → Data indication.
    let other = SocketAddr::new(peer1().ip(), 6001);
    let commands = h.peer_sends(relayed, other, b"side");
    assert_eq!(data_indication(&commands, &c, other), b"side");

    // Unbound channel numbers are dropped, as is ChannelData from another 5-tuple.
    assert!(h.channel_data(&c, 0x4001, b"x").is_empty());
    assert!(h.channel_data(&c, 0x4FFF, b"x").is_empty());
    let stranger = Client::new("192.0.2.10:50001", ALICE);
    assert!(h.channel_data(&stranger, 0x4000, b"x").is_empty());
    // Send indications to a peer with a channel still work.
    assert_eq!(
        h.send_indication(&mut c, peer1(), b"si"),
        vec![to_peer(relayed, peer1(), b"si")]
    );
}

/// RFC 8656 §12.2: number range, both attributes required, one number per peer and one peer
/// per number; a refresh of the same pair re-announces the binding.
#[test]
fn channel_bind_rules() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    for bad in [0x0000, 0x3FFF, 0x5000, 0x7FFF, 0xFFFF] {
        let reply = h.request(
            &mut c,
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(bad),
                Attribute::XorPeerAddress(peer1()),
            ],
        );
        expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);
    }
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[Attribute::XorPeerAddress(peer1())],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[Attribute::ChannelNumber(0x4000)],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer1()),
            Attribute::XorPeerAddress(peer2()),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);
    // None of that installed anything.
    let info = h.server.allocations().next().expect("allocation");
    assert!(info.channels.is_empty() && info.permissions.is_empty());

    let t0 = h.now;
    h.channel_bind(&mut c, 0x4000, peer1());
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer2()),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4001),
            Attribute::XorPeerAddress(peer1()),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);
    // The highest number is valid.
    h.channel_bind(&mut c, 0x4FFF, peer2());

    // Refresh of the same pair: both deadlines move, the binding is announced again.
    h.advance(secs(100));
    let commands = h.channel_bind(&mut c, 0x4000, peer1());
    assert_eq!(
        commands,
        vec![create_binding(
            id,
            &c,
            relayed,
            peer1(),
            0x4000,
            t0 + secs(400)
        )]
    );
    // A CreatePermission for the peer re-announces the binding with the new permission deadline.
    h.advance(secs(100));
    let (tid, commands) = h.signed_commands(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(SocketAddr::new(peer1().ip(), 1))],
    );
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert_eq!(
        commands[0],
        create_binding(id, &c, relayed, peer1(), 0x4000, t0 + secs(500))
    );
    let reply = one_reply(vec![commands[1].clone()], &c, tid);
    expect_success(&reply, Method::CREATE_PERMISSION, &c.key);
}

// ---- Expiry ----

/// RFC 8656 §9: when a permission expires its channels leave the fast path and the peer's data
/// is dropped; a new permission brings the channel back.
#[test]
fn permission_expiry() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    let t0 = h.now;
    h.channel_bind(&mut c, 0x4000, peer1());
    h.advance(secs(10));
    h.create_permission(&mut c, &[peer2()]);
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(300)));

    h.advance(secs(289));
    assert!(h.tick().is_empty(), "nothing due yet");
    h.advance(secs(1));
    assert_eq!(
        h.tick(),
        vec![delete_binding(id, &c, relayed, peer1(), 0x4000)]
    );
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(310)));
    assert!(h.peer_sends(relayed, peer1(), b"x").is_empty());
    assert!(h.channel_data(&c, 0x4000, b"x").is_empty());
    assert!(h.send_indication(&mut c, peer1(), b"x").is_empty());
    // peer2 still has its permission.
    let commands = h.peer_sends(relayed, peer2(), b"y");
    assert_eq!(data_indication(&commands, &c, peer2()), b"y");

    h.advance(secs(10));
    assert!(h.tick().is_empty(), "peer2's permission had no channel");
    assert!(h.peer_sends(relayed, peer2(), b"y").is_empty());

    // The channel itself is still bound: a new permission re-installs it, with the channel's
    // own (earlier) deadline.
    h.advance(secs(10));
    let (tid, commands) = h.signed_commands(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert_eq!(
        commands[0],
        create_binding(id, &c, relayed, peer1(), 0x4000, t0 + secs(600))
    );
    one_reply(commands[1..].to_vec(), &c, tid);
    assert_eq!(
        h.channel_data(&c, 0x4000, b"z"),
        vec![to_peer(relayed, peer1(), b"z")]
    );
    assert_eq!(
        h.peer_sends(relayed, peer1(), b"w"),
        vec![to_client(&c, vec![0x40, 0, 0, 1, b'w'])]
    );
}

/// RFC 8656 §12: an expired channel leaves the fast path and stays reserved (number and peer)
/// for 5 minutes; the same pair may be bound again meanwhile, other pairs only afterwards.
#[test]
fn channel_expiry_and_cooldown() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let t0 = h.now;
    let (id, relayed) = h.allocate_with(
        &mut c,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::Lifetime(3600),
        ],
    );
    h.channel_bind(&mut c, 0x4000, peer1());
    // Keep the permission alive past the channel's 600 s.
    h.advance(secs(290));
    let t1 = h.now;
    let (_, commands) = h.signed_commands(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    assert_eq!(
        commands[0],
        create_binding(id, &c, relayed, peer1(), 0x4000, t1 + secs(300))
    );
    h.advance(secs(290));
    let (_, commands) = h.signed_commands(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    assert_eq!(
        commands[0],
        create_binding(id, &c, relayed, peer1(), 0x4000, t0 + secs(600))
    );
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(600)));

    h.advance(secs(20));
    assert_eq!(
        h.tick(),
        vec![delete_binding(id, &c, relayed, peer1(), 0x4000)]
    );
    assert!(h
        .server
        .allocations()
        .next()
        .expect("alloc")
        .channels
        .is_empty());
    // Next deadline: the end of the permission, then of the reservation.
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(880)));
    // ChannelData on the expired channel is dropped; the peer (still permitted) now arrives as
    // Data indications.
    assert!(h.channel_data(&c, 0x4000, b"x").is_empty());
    let commands = h.peer_sends(relayed, peer1(), b"d");
    assert_eq!(data_indication(&commands, &c, peer1()), b"d");

    h.advance(secs(100));
    // During the cooldown: neither the number nor the peer can be bound to something else.
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer2()),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4002),
            Attribute::XorPeerAddress(peer1()),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);

    // Past t0 + 600 + 300 the reservation is gone (the permission too, at t0 + 880).
    h.advance(secs(180));
    assert_eq!(h.now, t0 + secs(880));
    assert!(
        h.tick().is_empty(),
        "the channel left the fast path already"
    );
    assert_eq!(
        h.server.poll_timeout(),
        Some(t0 + secs(600) + CHANNEL_COOLDOWN)
    );
    h.advance(secs(20));
    assert!(h.tick().is_empty());
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(3600)));
    let t2 = h.now;
    assert_eq!(
        h.channel_bind(&mut c, 0x4000, peer2()),
        vec![create_binding(
            id,
            &c,
            relayed,
            peer2(),
            0x4000,
            t2 + secs(300)
        )]
    );
    h.channel_bind(&mut c, 0x4002, peer1());
}

/// Rebinding the same pair during its reserved period is allowed and re-installs it.
#[test]
fn channel_rebind_same_pair_during_cooldown() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate_with(
        &mut c,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::Lifetime(3600),
        ],
    );
    h.channel_bind(&mut c, 0x4000, peer1());
    h.advance(secs(300));
    assert_eq!(
        h.tick(),
        vec![delete_binding(id, &c, relayed, peer1(), 0x4000)]
    );
    h.advance(secs(300));
    // The channel expires now, but it already left the fast path with its permission.
    assert!(h.tick().is_empty());
    h.advance(secs(60));
    let t = h.now;
    assert_eq!(
        h.channel_bind(&mut c, 0x4000, peer1()),
        vec![create_binding(
            id,
            &c,
            relayed,
            peer1(),
            0x4000,
            t + secs(300)
        )]
    );
    assert_eq!(
        h.channel_data(&c, 0x4000, b"again"),
        vec![to_peer(relayed, peer1(), b"again")]
    );
    assert_eq!(
        h.server.allocations().next().expect("alloc").channels,
        vec![(0x4000, peer1())]
    );
}

/// RFC 8656 §7: allocation expiry deletes installed channels then the allocation, and frees
/// the 5-tuple and the user's quota.
#[test]
fn allocation_expiry() {
    let mut h = Harness::with_config(|cfg| cfg.max_allocations_per_user = 1);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let t0 = h.now;
    let (id, relayed) = h.allocate(&mut c);
    // Channel to peer1 whose permission lapses first; channel to peer2 still installed at the end.
    h.channel_bind(&mut c, 0x4000, peer1());
    h.advance(secs(400));
    h.channel_bind(&mut c, 0x4001, peer2());
    assert_eq!(
        h.tick(),
        vec![delete_binding(id, &c, relayed, peer1(), 0x4000)]
    );
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(600)));

    h.advance(secs(199));
    assert!(h.tick().is_empty());
    assert_eq!(
        h.channel_data(&c, 0x4001, b"x"),
        vec![to_peer(relayed, peer2(), b"x")]
    );
    h.advance(secs(1));
    assert_eq!(
        h.tick(),
        vec![
            delete_binding(id, &c, relayed, peer2(), 0x4001),
            Command::DeleteAllocation { id, relayed },
        ]
    );
    assert_eq!(h.server.poll_timeout(), None);
    assert!(h.server.allocations().next().is_none());
    assert!(h.tick().is_empty(), "deleted once");
    assert!(h.peer_sends(relayed, peer2(), b"x").is_empty());
    assert!(h.channel_data(&c, 0x4001, b"x").is_empty());
    let reply = h.request(&mut c, Method::REFRESH, &[]);
    expect_signed_error(&reply, Method::REFRESH, 437, &c);
    // Quota and 5-tuple are free again.
    let (id2, _) = h.allocate(&mut c);
    assert_ne!(id2, id);
}

/// Data arriving exactly at the permission deadline (timer not yet run) is not relayed.
#[test]
fn traffic_at_deadline_is_dropped() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);
    h.channel_bind(&mut c, 0x4000, peer1());
    h.advance(secs(300));
    assert!(h.peer_sends(relayed, peer1(), b"x").is_empty());
    assert!(h.channel_data(&c, 0x4000, b"x").is_empty());
}

/// A pending allocation whose socket never gets bound still expires.
#[test]
fn pending_allocation_expires() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let t0 = h.now;
    let (_, commands) = h.signed_commands(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let [Command::CreateAllocation { id, relayed }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(600)));
    // Requests on the 5-tuple see no allocation yet.
    let reply = h.request(&mut c, Method::REFRESH, &[]);
    expect_signed_error(&reply, Method::REFRESH, 437, &c);
    h.advance(secs(600));
    assert_eq!(
        h.tick(),
        vec![Command::DeleteAllocation {
            id: *id,
            relayed: *relayed
        }]
    );
    h.server.allocation_bound(*id, h.now);
    assert!(h.drain().is_empty());
}

/// `poll_timeout` is the earliest deadline across allocations.
#[test]
fn poll_timeout_is_earliest_deadline() {
    let mut h = Harness::new();
    assert_eq!(h.server.poll_timeout(), None);
    let t0 = h.now;
    let mut a = Client::new("192.0.2.10:50000", ALICE);
    let mut b = Client::new("192.0.2.11:50000", BOB);
    h.allocate_with(
        &mut a,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::Lifetime(3600),
        ],
    );
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(3600)));
    h.advance(secs(50));
    h.allocate(&mut b);
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(650)));
    h.advance(secs(50));
    h.create_permission(&mut a, &[peer1()]);
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(400)));
    // Driving the server by its own deadlines always makes progress and ends empty.
    let mut steps = 0;
    while let Some(deadline) = h.server.poll_timeout() {
        assert!(
            deadline >= h.now,
            "deadlines never lie in the past after a tick"
        );
        h.now = deadline;
        h.tick();
        steps += 1;
        assert!(steps < 10, "timer loop does not converge");
    }
    assert!(h.server.allocations().next().is_none());
}

// ---- Bad input ----

/// Garbage and truncated datagrams: no command, no panic.
#[test]
fn garbage_is_ignored() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);
    h.channel_bind(&mut c, 0x4000, peer1());
    let tid = c.tid();
    let valid = c.build(tid, Method::REFRESH, &[Attribute::Lifetime(600)], true);
    let mut cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0x40],
        vec![0x40, 0x00, 0x00],
        vec![0xff; 40],
        vec![0x80, 1, 2, 3],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ];
    // Every truncation of a valid signed request.
    cases.extend((0..valid.len()).map(|n| valid[..n].to_vec()));
    // Wrong magic cookie.
    let mut bad_cookie = valid.clone();
    bad_cookie[4] ^= 0xff;
    cases.push(bad_cookie);
    // Length field not matching the datagram.
    let mut long = valid.clone();
    long.extend([0u8; 4]);
    cases.push(long);
    for case in &cases {
        assert!(h.client_sends(&c, case).is_empty(), "{case:?}");
    }
    // A FINGERPRINT that does not match means it is not STUN: dropped.
    let mut bad_fp = valid.clone();
    let last = bad_fp.len() - 1;
    bad_fp[last] ^= 1;
    assert!(h.client_sends(&c, &bad_fp).is_empty());
    // Responses and non-Send indications from clients are dropped.
    for class in [Class::Success, Class::Error, Class::Indication] {
        let bytes = MessageBuilder::new(class, Method::BINDING, c.tid()).finish(None, true);
        assert!(h.client_sends(&c, &bytes).is_empty(), "{class:?}");
    }
    // Garbage from peers is relayed (it is just data), but not to unknown relayed addresses.
    assert!(h
        .peer_sends(sa("203.0.113.1:1"), peer1(), &[0xff; 8])
        .is_empty());
    assert_eq!(h.peer_sends(relayed, peer1(), &[]).len(), 1);
    // The server is still healthy.
    h.refresh(&mut c, Some(600));
}

/// RFC 8489 §6.3.1: a request whose attributes do not parse gets 400 (unsigned: nothing could
/// be authenticated), with its transaction id.
#[test]
fn malformed_attributes_are_400() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut c);

    let raw = |tid: TransactionId, method: Method, body: &[u8]| -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&crate::stun::message_type(Class::Request, method).to_be_bytes());
        out.extend_from_slice(&u16::try_from(body.len()).expect("short").to_be_bytes());
        out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        out.extend_from_slice(&tid.0);
        out.extend_from_slice(body);
        out
    };
    let bodies: Vec<(Method, Vec<u8>)> = vec![
        // LIFETIME with a 3-byte value.
        (Method::REFRESH, vec![0x00, 0x0D, 0x00, 0x03, 0, 0, 1, 0]),
        // XOR-PEER-ADDRESS of family 3.
        (
            Method::CREATE_PERMISSION,
            vec![0x00, 0x12, 0x00, 0x08, 0x00, 0x03, 0, 0, 1, 2, 3, 4],
        ),
        // CHANNEL-NUMBER of 2 bytes.
        (
            Method::CHANNEL_BIND,
            vec![0x00, 0x0C, 0x00, 0x02, 0x40, 0x00, 0, 0],
        ),
        // Attribute length past the end of the message.
        (Method::ALLOCATE, vec![0x00, 0x19, 0x00, 0x40, 17, 0, 0, 0]),
        // USERNAME that is not UTF-8.
        (
            Method::ALLOCATE,
            vec![0x00, 0x06, 0x00, 0x02, 0xff, 0xfe, 0, 0],
        ),
        // Something after FINGERPRINT.
        (
            Method::BINDING,
            vec![0x80, 0x28, 0x00, 0x04, 0, 0, 0, 0, 0x80, 0x22, 0x00, 0x00],
        ),
    ];
    for (method, body) in bodies {
        let tid = c.tid();
        let bytes = raw(tid, method, &body);
        let commands = h.client_sends(&c, &bytes);
        let [Command::SendToClient { payload, .. }] = commands.as_slice() else {
            panic!("expected one 400 for {method:?}, got {commands:?}");
        };
        let msg = Message::decode(payload).expect("decodes");
        assert_eq!(msg.transaction_id(), tid);
        expect_error(payload, method, 400, None);
    }
    // A malformed indication gets nothing.
    let mut bytes = raw(c.tid(), Method::SEND, &[0x00, 0x12, 0x00, 0x01, 0, 0, 0, 0]);
    bytes[1] |= 0x10; // indication class bit
    assert!(h.client_sends(&c, &bytes).is_empty());
    // Requests for methods the server does not serve: 400.
    for method in [
        Method::SEND,
        Method::DATA,
        Method::new(0x0AB).expect("method"),
    ] {
        let tid = c.tid();
        let bytes = c.build(tid, method, &[], true);
        expect_error(&h.transact(&c, &bytes, tid), method, 400, None);
    }
    // The allocation is untouched.
    h.refresh(&mut c, None);
}

/// Unauthenticated answers are rate limited per source IP (burst, then silence, then refill);
/// authenticated requests are not affected.
#[test]
fn unauthenticated_requests_are_rate_limited() {
    let mut h = Harness::with_config(|cfg| cfg.unauthenticated_rate = (5, 1));
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    // The 401 of the challenge uses one token.
    h.challenge(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let binding = |c: &mut Client| {
        let tid = c.tid();
        (
            tid,
            MessageBuilder::new(Class::Request, Method::BINDING, tid).finish(None, true),
        )
    };
    for _ in 0..4 {
        let (tid, bytes) = binding(&mut c);
        h.transact(&c, &bytes, tid);
    }
    // Burst used up: silence for Binding, 401s and 400s alike, from any port of that IP.
    for _ in 0..10 {
        let (_, bytes) = binding(&mut c);
        assert!(h.client_sends(&c, &bytes).is_empty());
        let tid = c.tid();
        let bytes = c.build(
            tid,
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(UDP)],
            false,
        );
        assert!(h.client_sends(&c, &bytes).is_empty());
        let tid = c.tid();
        let bytes = c.build(tid, Method::SEND, &[], false);
        assert!(h.client_sends(&c, &bytes).is_empty());
    }
    let mut same_ip = Client::new("192.0.2.10:50001", ALICE);
    let (_, bytes) = binding(&mut same_ip);
    assert!(h.client_sends(&same_ip, &bytes).is_empty());
    // Another source IP has its own bucket.
    let mut other = Client::new("192.0.2.11:50000", ALICE);
    let (tid, bytes) = binding(&mut other);
    h.transact(&other, &bytes, tid);
    // Authenticated requests still work while the bucket is empty.
    h.allocate(&mut c);
    // One token per second comes back.
    h.advance(secs(1));
    let (tid, bytes) = binding(&mut c);
    h.transact(&c, &bytes, tid);
    let (_, bytes) = binding(&mut c);
    assert!(h.client_sends(&c, &bytes).is_empty());
}

// ---- Property tests ----

/// Attribute types worth aiming random values at: the ones the codec and server interpret.
const INTERESTING_TYPES: &[u16] = &[
    attr_type::USERNAME,
    attr_type::MESSAGE_INTEGRITY,
    attr_type::ERROR_CODE,
    attr_type::UNKNOWN_ATTRIBUTES,
    attr_type::CHANNEL_NUMBER,
    attr_type::LIFETIME,
    attr_type::XOR_PEER_ADDRESS,
    attr_type::DATA,
    attr_type::REALM,
    attr_type::NONCE,
    attr_type::XOR_RELAYED_ADDRESS,
    attr_type::REQUESTED_ADDRESS_FAMILY,
    attr_type::EVEN_PORT,
    attr_type::REQUESTED_TRANSPORT,
    attr_type::DONT_FRAGMENT,
    attr_type::MESSAGE_INTEGRITY_SHA256,
    attr_type::XOR_MAPPED_ADDRESS,
    attr_type::RESERVATION_TOKEN,
    attr_type::ADDITIONAL_ADDRESS_FAMILY,
    attr_type::ADDRESS_ERROR_CODE,
    attr_type::ICMP,
    attr_type::SOFTWARE,
    attr_type::FINGERPRINT,
];

/// Arbitrary bytes, STUN-shaped messages with random attributes, and ChannelData-shaped
/// datagrams.
fn datagram() -> impl Strategy<Value = Vec<u8>> {
    let attr_type = prop_oneof![proptest::sample::select(INTERESTING_TYPES), any::<u16>(),];
    let attribute = (attr_type, proptest::collection::vec(any::<u8>(), 0..24));
    let stun = (
        0u16..0x4000,
        any::<[u8; 12]>(),
        proptest::collection::vec(attribute, 0..6),
    )
        .prop_map(|(msg_type, tid, attrs)| {
            let mut body = Vec::new();
            for (typ, value) in attrs {
                body.extend_from_slice(&typ.to_be_bytes());
                body.extend_from_slice(&u16::try_from(value.len()).unwrap_or(0).to_be_bytes());
                body.extend_from_slice(&value);
                while body.len() % 4 != 0 {
                    body.push(0);
                }
            }
            let mut out = Vec::new();
            out.extend_from_slice(&msg_type.to_be_bytes());
            out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
            out.extend_from_slice(&tid);
            out.extend_from_slice(&body);
            out
        });
    let channel_data = (
        0x3ff0u16..0x5010,
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(channel, len, data)| {
            let mut out = Vec::new();
            out.extend_from_slice(&channel.to_be_bytes());
            // Mostly honest lengths, sometimes lies.
            let len = if len % 4 == 0 {
                len
            } else {
                u16::try_from(data.len()).unwrap_or(0)
            };
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&data);
            out
        });
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..80),
        stun,
        channel_data,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary datagrams from the client and from peers (known or not) never panic, never
    /// touch the allocation, and the server keeps answering Binding and signed Refresh.
    #[test]
    fn arbitrary_datagrams_never_break_the_server(
        inputs in proptest::collection::vec(
            (any::<bool>(), datagram(), 0u8..4, 0u16..3000),
            1..12,
        ),
    ) {
        let mut h = Harness::new();
        let mut c = Client::new("192.0.2.10:50000", ALICE);
        let (id, relayed) = h.allocate(&mut c);
        h.channel_bind(&mut c, 0x4000, peer1());
        let peers = [peer1(), peer2(), sa("198.51.100.7:1"), peer_v6()];
        for (from_client, bytes, who, millis) in inputs {
            h.advance(Duration::from_millis(u64::from(millis)));
            if from_client {
                h.server.handle_client_datagram(c.addr, c.listener, &bytes, h.now);
            } else {
                let target = if who % 2 == 0 { relayed } else { sa("203.0.113.1:1") };
                h.server.handle_peer_datagram(target, peers[usize::from(who)], &bytes, h.now);
            }
            for command in h.drain() {
                // Nothing unauthenticated may change state: only data and answers come out.
                match command {
                    Command::SendToClient { listener, client, .. } => {
                        prop_assert_eq!((listener, client), (c.listener, c.addr));
                    }
                    Command::SendToPeer { relayed: from, peer, .. } => {
                        prop_assert_eq!((from, peer.ip()), (relayed, peer1().ip()));
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
        }
        let info = h.server.allocations().next().expect("allocation survives");
        prop_assert_eq!(info.id, id);
        prop_assert_eq!(info.channels, vec![(0x4000, peer1())]);

        let tid = c.tid();
        let bytes = MessageBuilder::new(Class::Request, Method::BINDING, tid).finish(None, true);
        let reply = h.transact(&c, &bytes, tid);
        let msg = Message::decode(&reply).expect("decodes");
        prop_assert_eq!(msg.class(), Class::Success);
        prop_assert_eq!(msg.xor_mapped_address(), Some(c.addr));
        h.refresh(&mut c, Some(600));
    }

    /// The same with no allocation at all, from arbitrary sources.
    #[test]
    fn arbitrary_datagrams_without_state(
        inputs in proptest::collection::vec((datagram(), any::<u16>(), any::<u16>()), 1..12),
    ) {
        let mut h = Harness::new();
        for (bytes, port, relay_port) in inputs {
            let client = SocketAddr::new(ip("192.0.2.10"), port);
            h.server.handle_client_datagram(client, listener(), &bytes, h.now);
            let relayed = SocketAddr::new(relay_v4(), relay_port);
            h.server.handle_peer_datagram(relayed, peer1(), &bytes, h.now);
            for command in h.drain() {
                let is_reply =
                    matches!(command, Command::SendToClient { client: to, .. } if to == client);
                prop_assert!(is_reply, "unexpected {:?}", command);
            }
        }
        prop_assert_eq!(h.server.poll_timeout(), None);
        let mut c = Client::new("192.0.2.99:4000", ALICE);
        let tid = c.tid();
        let bytes = MessageBuilder::new(Class::Request, Method::BINDING, tid).finish(None, true);
        h.transact(&c, &bytes, tid);
        h.allocate(&mut c);
    }
}

/// RFC 8656 §7.2 step 4: the server cannot set DF on what it relays, so DONT-FRAGMENT is an
/// unknown comprehension-required attribute; without it the same client allocates.
#[test]
fn allocate_with_dont_fragment_is_420() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.challenge(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP), Attribute::DontFragment],
    );
    let msg = expect_error(&reply, Method::ALLOCATE, 420, Some(&c.key));
    assert!(msg
        .attributes()
        .iter()
        .any(|a| matches!(a, Attribute::UnknownAttributes(l) if l == &[attr_type::DONT_FRAGMENT])));
    assert_eq!(h.server.allocations().count(), 0);
    h.allocate(&mut c);
}

/// A channel to port 0 has no destination: 400, nothing installed.
#[test]
fn channel_bind_to_port_zero_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut c);
    let peer = SocketAddr::new(peer1().ip(), 0);
    let attrs = [
        Attribute::ChannelNumber(0x4000),
        Attribute::XorPeerAddress(peer),
    ];
    let (tid, commands) = h.signed_commands(&mut c, Method::CHANNEL_BIND, &attrs);
    let reply = one_reply(commands, &c, tid);
    expect_error(&reply, Method::CHANNEL_BIND, 400, Some(&c.key));
    // A Send indication to port 0 is dropped, even with a permission.
    h.create_permission(&mut c, &[peer1()]);
    assert_eq!(h.send_indication(&mut c, peer, b"x"), vec![]);
}

/// Channels per allocation are capped (508), so one client cannot fill the kernel's table.
#[test]
fn channels_per_allocation_are_capped() {
    let mut h = Harness::with_config(|c| c.max_channels_per_allocation = 2);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut c);
    let port = |p: u16| SocketAddr::new(peer1().ip(), p);
    h.channel_bind(&mut c, 0x4000, port(1000));
    h.channel_bind(&mut c, 0x4001, port(1001));
    let attrs = [
        Attribute::ChannelNumber(0x4002),
        Attribute::XorPeerAddress(port(1002)),
    ];
    let (tid, commands) = h.signed_commands(&mut c, Method::CHANNEL_BIND, &attrs);
    let reply = one_reply(commands, &c, tid);
    expect_error(&reply, Method::CHANNEL_BIND, 508, Some(&c.key));
    // Refreshing an existing channel is not a new one.
    h.channel_bind(&mut c, 0x4001, port(1001));
}

/// The kernel's deadline includes the allocation's expiry, and a Refresh moves it.
#[test]
fn kernel_deadline_follows_the_allocation_lifetime() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    let allocated = h.now;
    // 400 s in, the permission (300 s) would outlive the allocation (600 s from the start).
    h.advance(secs(400));
    let commands = h.channel_bind(&mut c, 0x4000, peer1());
    assert_eq!(
        commands,
        vec![create_binding(
            id,
            &c,
            relayed,
            peer1(),
            0x4000,
            allocated + secs(600)
        )]
    );
    let commands = h.refresh(&mut c, Some(600));
    let t = h.now;
    assert_eq!(
        commands,
        vec![create_binding(
            id,
            &c,
            relayed,
            peer1(),
            0x4000,
            t + secs(300)
        )]
    );
}

// ---- Address families (RFC 8656 §7.2, §9, §12; RFC 6156) ----

fn dual_stack(cfg: &mut ServerConfig) {
    cfg.relay_ips = vec![relay_v4(), relay_v6()];
}

fn listener_v6() -> SocketAddr {
    sa("[2001:db8::1]:3478")
}

/// A client on IPv6, talking to the relay's IPv6 listener.
fn client_v6() -> Client {
    let mut c = Client::new("[2001:db8:ffff::10]:50000", ALICE);
    c.listener = listener_v6();
    c
}

/// Every XOR-RELAYED-ADDRESS of a response, in order.
fn relayed_addresses(msg: &Message<'_>) -> Vec<SocketAddr> {
    msg.attributes()
        .iter()
        .filter_map(|a| match a {
            Attribute::XorRelayedAddress(r) => Some(*r),
            _ => None,
        })
        .collect()
}

const DUAL: [Attribute<'static>; 2] = [
    Attribute::RequestedTransport(UDP),
    Attribute::AdditionalAddressFamily(AddressFamily::V6),
];

impl Harness {
    /// A dual allocation: CreateAllocation for the IPv4 address, then (once bound) for the
    /// IPv6 one, then the success with both; returns (id, IPv4 relayed, IPv6 relayed).
    #[track_caller]
    fn allocate_dual(&mut self, client: &mut Client) -> (AllocationId, SocketAddr, SocketAddr) {
        let (tid, commands) = self.signed_commands(client, Method::ALLOCATE, &DUAL);
        let [Command::CreateAllocation { id, relayed: v4 }] = commands.as_slice() else {
            panic!("expected one CreateAllocation, got {commands:?}");
        };
        let (id, v4) = (*id, *v4);
        assert_eq!(v4.ip(), relay_v4());
        self.server.allocation_bound(id, self.now);
        let commands = self.drain();
        let [Command::CreateAllocation {
            id: second,
            relayed: v6,
        }] = commands.as_slice()
        else {
            panic!("expected the IPv6 CreateAllocation, got {commands:?}");
        };
        let v6 = *v6;
        assert_eq!((*second, v6.ip()), (id, relay_v6()));
        self.server.allocation_bound(id, self.now);
        let reply = one_reply(self.drain(), client, tid);
        let msg = expect_success(&reply, Method::ALLOCATE, &client.key);
        assert_eq!(relayed_addresses(&msg), vec![v4, v6]);
        assert_eq!(msg.xor_mapped_address(), Some(client.addr));
        assert!(
            !msg.attributes()
                .iter()
                .any(|a| matches!(a, Attribute::AddressErrorCode { .. })),
            "both families granted: no ADDRESS-ERROR-CODE"
        );
        (id, v4, v6)
    }
}

/// RFC 6156 / RFC 8656 §7.2 step 6: an IPv4 client asks for an IPv6 relayed address; data
/// crosses families both ways (ChannelData and Send/Data indications).
#[test]
fn ipv4_client_relays_to_ipv6_peers() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate_with(
        &mut c,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::RequestedAddressFamily(AddressFamily::V6),
        ],
    );
    assert_eq!(relayed.ip(), relay_v6());
    // An IPv4 peer has no relayed address of its family here: 443 (RFC 8656 §9, §12).
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 443, &c);
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer1()),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 443, &c);

    // The binding names the IPv6 relayed address; the kernel sync keeps it (mixed) off the
    // kernel, the socket path carries it.
    let t = h.now;
    assert_eq!(
        h.channel_bind(&mut c, 0x4000, peer_v6()),
        vec![create_binding(
            id,
            &c,
            relayed,
            peer_v6(),
            0x4000,
            t + secs(300)
        )]
    );
    assert_eq!(
        h.channel_data(&c, 0x4000, b"to v6"),
        vec![to_peer(relayed, peer_v6(), b"to v6")]
    );
    assert_eq!(
        h.peer_sends(relayed, peer_v6(), b"back"),
        vec![to_client(
            &c,
            vec![0x40, 0x00, 0x00, 0x04, b'b', b'a', b'c', b'k']
        )]
    );
    // Send indication out of the IPv6 socket; a reply from a port without a channel comes back
    // as a Data indication with an IPv6 XOR-PEER-ADDRESS over IPv4.
    let other = SocketAddr::new(peer_v6().ip(), 8001);
    assert_eq!(
        h.send_indication(&mut c, other, b"si"),
        vec![to_peer(relayed, other, b"si")]
    );
    let commands = h.peer_sends(relayed, other, b"di");
    assert_eq!(data_indication(&commands, &c, other), b"di");
    // A Send indication to an IPv4 peer is dropped: no relayed address of its family.
    assert!(h.send_indication(&mut c, peer1(), b"no").is_empty());
}

/// The mirror case: an IPv6 client asks for an IPv4 relayed address (RFC 8656 §7.2 step 6).
#[test]
fn ipv6_client_relays_to_ipv4_peers() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = client_v6();
    let (id, relayed) = h.allocate_with(
        &mut c,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::RequestedAddressFamily(AddressFamily::V4),
        ],
    );
    assert_eq!(relayed.ip(), relay_v4());
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer_v6())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 443, &c);
    let t = h.now;
    assert_eq!(
        h.channel_bind(&mut c, 0x4000, peer1()),
        vec![create_binding(
            id,
            &c,
            relayed,
            peer1(),
            0x4000,
            t + secs(300)
        )]
    );
    assert_eq!(
        h.channel_data(&c, 0x4000, b"to v4"),
        vec![to_peer(relayed, peer1(), b"to v4")]
    );
    assert_eq!(
        h.peer_sends(relayed, peer1(), b"back"),
        vec![to_client(
            &c,
            vec![0x40, 0x00, 0x00, 0x04, b'b', b'a', b'c', b'k']
        )]
    );
    h.create_permission(&mut c, &[peer2()]);
    assert_eq!(
        h.send_indication(&mut c, peer2(), b"si"),
        vec![to_peer(relayed, peer2(), b"si")]
    );
    let commands = h.peer_sends(relayed, peer2(), b"di");
    assert_eq!(data_indication(&commands, &c, peer2()), b"di");
    // Without REQUESTED-ADDRESS-FAMILY an IPv6 client also gets IPv4 (the RFC's default).
    let mut d = client_v6();
    d.addr = sa("[2001:db8:ffff::10]:50001");
    let (_, default) = h.allocate(&mut d);
    assert_eq!(default.ip(), relay_v4());
}

/// RFC 8656 §7.2 step 6: a family without a relay IP of its own is 440, whatever the client's
/// family.
#[test]
fn cross_family_without_a_relay_ip_is_440() {
    // IPv4 only: an IPv4 client asking for IPv6.
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::RequestedAddressFamily(AddressFamily::V6),
        ],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 440, &c);
    // IPv6 only: an IPv6 client asking for IPv4, explicitly or by default, and a dual
    // allocation (its IPv4 half is the required one).
    let mut h = Harness::with_config(|cfg| cfg.relay_ips = vec![relay_v6()]);
    let mut c = client_v6();
    let v4 = [
        Attribute::RequestedTransport(UDP),
        Attribute::RequestedAddressFamily(AddressFamily::V4),
    ];
    let reply = h.request(&mut c, Method::ALLOCATE, &v4);
    expect_signed_error(&reply, Method::ALLOCATE, 440, &c);
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 440, &c);
    let reply = h.request(&mut c, Method::ALLOCATE, &DUAL);
    expect_signed_error(&reply, Method::ALLOCATE, 440, &c);
    assert!(h.server.allocations().next().is_none());
    assert_eq!(h.quota.total(), 0, "refusals hold no quota");
}

/// RFC 8656 §7.2 step 6: REQUESTED-ADDRESS-FAMILY together with ADDITIONAL-ADDRESS-FAMILY is
/// 400 even when both families could be served; ADDITIONAL-ADDRESS-FAMILY IPv4 is 400.
#[test]
fn dual_allocation_attribute_rules() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    for family in [AddressFamily::V4, AddressFamily::V6] {
        let reply = h.request(
            &mut c,
            Method::ALLOCATE,
            &[
                Attribute::RequestedTransport(UDP),
                Attribute::RequestedAddressFamily(family),
                Attribute::AdditionalAddressFamily(AddressFamily::V6),
            ],
        );
        expect_signed_error(&reply, Method::ALLOCATE, 400, &c);
    }
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::AdditionalAddressFamily(AddressFamily::V4),
        ],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 400, &c);
    assert!(h.server.allocations().next().is_none());
}

/// A dual allocation: two relayed addresses, one socket each, one allocation id and one
/// quota unit; permissions and channels use the relayed address of the peer's family.
#[test]
fn dual_allocation_relays_per_family() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, v4, v6) = h.allocate_dual(&mut c);
    assert_eq!(h.quota.of_user(ALICE.0), 1);
    let info = h.server.allocations().next().expect("allocation");
    assert_eq!(
        (info.id, info.relayed, info.additional_relayed),
        (id, v4, Some(v6))
    );
    assert!(h.server.config.live_relayed.contains(v4) && h.server.config.live_relayed.contains(v6));

    // One CreatePermission may name peers of both families (RFC 8656 §10.2).
    h.create_permission(&mut c, &[peer2(), peer_v6()]);
    assert_eq!(
        h.send_indication(&mut c, peer2(), b"four"),
        vec![to_peer(v4, peer2(), b"four")]
    );
    assert_eq!(
        h.send_indication(&mut c, peer_v6(), b"six"),
        vec![to_peer(v6, peer_v6(), b"six")]
    );
    let commands = h.peer_sends(v6, peer_v6(), b"six back");
    assert_eq!(data_indication(&commands, &c, peer_v6()), b"six back");
    let commands = h.peer_sends(v4, peer2(), b"four back");
    assert_eq!(data_indication(&commands, &c, peer2()), b"four back");

    // Channels: each binding carries the relayed address of its peer's family, so the IPv4
    // one (all one family with this IPv4 client) can go to the kernel.
    let t = h.now;
    assert_eq!(
        h.channel_bind(&mut c, 0x4000, peer1()),
        vec![create_binding(id, &c, v4, peer1(), 0x4000, t + secs(300))]
    );
    assert_eq!(
        h.channel_bind(&mut c, 0x4001, peer_v6()),
        vec![create_binding(id, &c, v6, peer_v6(), 0x4001, t + secs(300))]
    );
    assert_eq!(
        h.channel_data(&c, 0x4000, b"a"),
        vec![to_peer(v4, peer1(), b"a")]
    );
    assert_eq!(
        h.channel_data(&c, 0x4001, b"b"),
        vec![to_peer(v6, peer_v6(), b"b")]
    );
    assert_eq!(
        h.peer_sends(v6, peer_v6(), b"c"),
        vec![to_client(&c, vec![0x40, 0x01, 0x00, 0x01, b'c'])]
    );
    assert_eq!(
        h.peer_sends(v4, peer1(), b"d"),
        vec![to_client(&c, vec![0x40, 0x00, 0x00, 0x01, b'd'])]
    );
    // Policy applies per peer as for any allocation: a ULA peer is 403.
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(sa("[fd00::1]:9"))],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 403, &c);

    // RFC 8656 §8: either family refreshes the (one) lifetime and re-announces both channels.
    let t = h.now;
    for family in [AddressFamily::V4, AddressFamily::V6] {
        let attrs = [
            Attribute::RequestedAddressFamily(family),
            Attribute::Lifetime(600),
        ];
        let (tid, mut commands) = h.signed_commands(&mut c, Method::REFRESH, &attrs);
        let reply = one_reply(commands.split_off(2), &c, tid);
        expect_success(&reply, Method::REFRESH, &c.key);
        assert_eq!(
            commands,
            vec![
                create_binding(id, &c, v4, peer1(), 0x4000, t + secs(300)),
                create_binding(id, &c, v6, peer_v6(), 0x4001, t + secs(300)),
            ]
        );
    }

    // Deleting closes both sockets after the channels left the fast path.
    assert_eq!(
        h.refresh(&mut c, Some(0)),
        vec![
            delete_binding(id, &c, v4, peer1(), 0x4000),
            delete_binding(id, &c, v6, peer_v6(), 0x4001),
            Command::DeleteAllocation { id, relayed: v4 },
            Command::DeleteAllocation { id, relayed: v6 },
        ]
    );
    assert!(h.server.allocations().next().is_none());
    assert_eq!(h.quota.of_user(ALICE.0), 0);
    assert!(
        !h.server.config.live_relayed.contains(v4) && !h.server.config.live_relayed.contains(v6)
    );
    assert!(h.peer_sends(v6, peer_v6(), b"late").is_empty());
    assert!(h.channel_data(&c, 0x4001, b"late").is_empty());
}

/// An expiring dual allocation closes both sockets.
#[test]
fn dual_allocation_expiry_closes_both_sockets() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, v4, v6) = h.allocate_dual(&mut c);
    h.advance(secs(600));
    assert_eq!(
        h.tick(),
        vec![
            Command::DeleteAllocation { id, relayed: v4 },
            Command::DeleteAllocation { id, relayed: v6 },
        ]
    );
    assert_eq!(h.server.poll_timeout(), None);
}

/// An IPv6 client's dual allocation: its IPv6 channels are same-family (kernel-capable), its
/// IPv4 ones cross families.
#[test]
fn dual_allocation_from_an_ipv6_client() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = client_v6();
    let (id, v4, v6) = h.allocate_dual(&mut c);
    let t = h.now;
    assert_eq!(
        h.channel_bind(&mut c, 0x4000, peer_v6()),
        vec![create_binding(id, &c, v6, peer_v6(), 0x4000, t + secs(300))]
    );
    assert_eq!(
        h.channel_bind(&mut c, 0x4001, peer1()),
        vec![create_binding(id, &c, v4, peer1(), 0x4001, t + secs(300))]
    );
    assert_eq!(
        h.peer_sends(v4, peer1(), b"x"),
        vec![to_client(&c, vec![0x40, 0x01, 0x00, 0x01, b'x'])]
    );
}

/// The IPv6 socket of a dual allocation cannot be bound: after the retries the IPv4 address
/// is granted alone with ADDRESS-ERROR-CODE 508 for IPv6 (RFC 8656 §7.2), and deleting it
/// closes only the socket it has.
#[test]
fn dual_allocation_without_an_ipv6_socket_is_ipv4_with_508() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (tid, commands) = h.signed_commands(&mut c, Method::ALLOCATE, &DUAL);
    let [Command::CreateAllocation { id, relayed: v4 }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    let (id, v4) = (*id, *v4);
    h.server.allocation_bound(id, h.now);
    let mut tried = Vec::new();
    let mut commands = h.drain();
    for _ in 0..MAX_BIND_ATTEMPTS {
        let [Command::CreateAllocation { id: again, relayed }] = commands.as_slice() else {
            panic!("expected an IPv6 CreateAllocation, got {commands:?}");
        };
        assert_eq!(*again, id);
        assert_eq!(relayed.ip(), relay_v6());
        assert!(!tried.contains(relayed), "a failed port is not retried");
        tried.push(*relayed);
        h.server.allocation_bind_failed(id, h.now);
        commands = h.drain();
    }
    let reply = one_reply(commands, &c, tid);
    let msg = expect_success(&reply, Method::ALLOCATE, &c.key);
    assert_eq!(relayed_addresses(&msg), vec![v4]);
    assert!(msg.attributes().contains(&Attribute::AddressErrorCode {
        family: AddressFamily::V6,
        error: ErrorCode {
            code: 508,
            reason: "Insufficient Capacity",
        },
    }));
    let info = h.server.allocations().next().expect("allocation");
    assert_eq!(info.additional_relayed, None);
    // IPv6 peers: 443, this allocation has no IPv6 relayed address after all.
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer_v6())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 443, &c);
    let reply = h.request(
        &mut c,
        Method::REFRESH,
        &[Attribute::RequestedAddressFamily(AddressFamily::V6)],
    );
    expect_signed_error(&reply, Method::REFRESH, 443, &c);
    assert_eq!(
        h.refresh(&mut c, Some(0)),
        vec![Command::DeleteAllocation { id, relayed: v4 }]
    );
}

/// A retransmitted dual Allocate while the IPv6 socket is being bound gets nothing yet, then
/// the same success as the original.
#[test]
fn dual_allocation_retransmission() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.challenge(&mut c, Method::ALLOCATE, &DUAL);
    let tid = c.tid();
    let bytes = c.build(tid, Method::ALLOCATE, &DUAL, true);
    let commands = h.client_sends(&c, &bytes);
    let [Command::CreateAllocation { id, .. }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    let id = *id;
    h.server.allocation_bound(id, h.now);
    assert_eq!(h.drain().len(), 1, "the IPv6 CreateAllocation");
    assert!(h.client_sends(&c, &bytes).is_empty());
    h.server.allocation_bound(id, h.now);
    let first = one_reply(h.drain(), &c, tid);
    let again = h.transact(&c, &bytes, tid);
    assert_eq!(first, again);
    assert_eq!(h.quota.of_user(ALICE.0), 1);
}

/// EVEN-PORT (R=0) on a dual allocation: both relayed ports are even.
#[test]
fn dual_allocation_even_ports() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (tid, commands) = h.signed_commands(
        &mut c,
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::AdditionalAddressFamily(AddressFamily::V6),
            Attribute::EvenPort(false),
        ],
    );
    let [Command::CreateAllocation { id, relayed: v4 }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    let (id, v4) = (*id, *v4);
    h.server.allocation_bound(id, h.now);
    let commands = h.drain();
    let [Command::CreateAllocation { relayed: v6, .. }] = commands.as_slice() else {
        panic!("expected the IPv6 CreateAllocation, got {commands:?}");
    };
    let v6 = *v6;
    h.server.allocation_bound(id, h.now);
    let reply = one_reply(h.drain(), &c, tid);
    let msg = expect_success(&reply, Method::ALLOCATE, &c.key);
    assert_eq!(relayed_addresses(&msg), vec![v4, v6]);
    assert!(v4.port() % 2 == 0 && v6.port() % 2 == 0, "{v4} {v6}");
}
