//! The test harness: a simulated TURN client ([`Client`]) that learns REALM and NONCE from a 401
//! like a real one, the server plus a hand-driven clock ([`Harness`]), and the helpers that build
//! expected [`Command`]s and check responses. The behaviour files import all of it.

pub(super) use std::net::{IpAddr, SocketAddr};
pub(super) use std::time::{Duration, Instant};

pub(super) use base64::engine::general_purpose::STANDARD;
pub(super) use base64::Engine as _;
pub(super) use hmac::{Hmac, Mac};
pub(super) use rand::rngs::StdRng;
pub(super) use rand::SeedableRng;
pub(super) use sha1::Sha1;

pub(super) use std::sync::Arc;

pub(super) use crate::auth::{Credentials, LongTermKey};
pub(super) use crate::channel_data::ChannelData;
pub(super) use crate::policy::PeerPolicy;
pub(super) use crate::server::{
    AllocationId, AllocationQuota, Command, Forward, QuotaLedger, Server, ServerConfig,
    CHANNEL_COOLDOWN, MAX_BIND_ATTEMPTS,
};
pub(super) use crate::stun::{
    attr_type, AddressFamily, Attribute, Class, ErrorCode, Integrity, Message, MessageBuilder,
    Method, TransactionId, MAGIC_COOKIE,
};
pub(super) use crate::Transport;

pub(super) const REALM: &str = "relay.test";
pub(super) const ALICE: (&str, &str) = ("alice", "alice-password");
pub(super) const BOB: (&str, &str) = ("bob", "bob-password");
pub(super) const REST_SECRET: &str = "rest-shared-secret";
pub(super) const UNIX_NOW: u64 = 1_700_000_000;
pub(super) const UDP: u8 = 17;
pub(super) const TCP: u8 = 6;

pub(super) fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub(super) fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip literal")
}

/// The relay's IPv4 address; 203.0.113.0/24 is allowed as a peer range in the test policy so
/// that the "relay's own address" rule is what denies it.
pub(super) fn relay_v4() -> IpAddr {
    ip("203.0.113.1")
}

pub(super) fn relay_v6() -> IpAddr {
    ip("2001:db8::1")
}

pub(super) fn listener() -> SocketAddr {
    sa("203.0.113.1:3478")
}

pub(super) fn peer1() -> SocketAddr {
    sa("93.184.216.34:6000")
}

pub(super) fn peer2() -> SocketAddr {
    sa("1.1.1.1:7000")
}

pub(super) fn peer_v6() -> SocketAddr {
    sa("[2606:4700:4700::1111]:8000")
}

pub(super) fn base_config() -> ServerConfig {
    let mut credentials = Credentials::new(REALM);
    credentials.add_user(ALICE.0, ALICE.1);
    credentials.add_user(BOB.0, BOB.1);
    credentials.add_rest_secret(REST_SECRET);
    let mut policy = PeerPolicy::safe_default();
    policy.allow("203.0.113.0/24".parse().expect("cidr"));
    ServerConfig::new(REALM, vec![relay_v4()], credentials, policy)
}

/// The command that would carry the datagram a [`Forward`] decides about, with its payload
/// materialised, so the behaviour tests compare one kind of value.
pub(super) fn as_command(forward: &Forward, data: &[u8]) -> Command {
    let payload = forward.to_vec(data);
    match *forward {
        Forward::ToPeer { relayed, peer, .. } => Command::SendToPeer {
            relayed,
            peer,
            payload,
        },
        Forward::ToClient {
            listener,
            client,
            transport,
            ..
        } => Command::SendToClient {
            listener,
            client,
            transport,
            payload,
        },
    }
}

/// The server plus the simulated clock.
pub(super) struct Harness {
    pub(super) server: Server<StdRng>,
    /// The allocation counts the server takes from, read by the quota tests.
    pub(super) quota: Arc<QuotaLedger>,
    pub(super) now: Instant,
    /// The fast path's permission commands, kept apart so the other tests see the commands
    /// they are about (`permission_commands_follow_the_permissions` checks these).
    pub(super) permissions: Vec<Command>,
}

impl Harness {
    pub(super) fn new() -> Self {
        Self::with_config(|_| {})
    }

    pub(super) fn with_config(tweak: impl FnOnce(&mut ServerConfig)) -> Self {
        Self::with_seed(7, tweak)
    }

    pub(super) fn with_seed(seed: u64, tweak: impl FnOnce(&mut ServerConfig)) -> Self {
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

    pub(super) fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    pub(super) fn drain(&mut self) -> Vec<Command> {
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
    /// A relayed datagram (a [`Forward`]) is listed as the command that would carry it, first.
    pub(super) fn client_sends(&mut self, client: &Client, bytes: &[u8]) -> Vec<Command> {
        let forward = self.server.handle_client_message(
            client.addr,
            client.listener,
            client.transport,
            bytes,
            self.now,
        );
        let mut commands: Vec<Command> =
            forward.map(|f| as_command(&f, bytes)).into_iter().collect();
        commands.extend(self.drain());
        commands
    }

    /// A datagram from `peer` to `relayed`; returns everything the server emits.
    pub(super) fn peer_sends(
        &mut self,
        relayed: SocketAddr,
        peer: SocketAddr,
        bytes: &[u8],
    ) -> Vec<Command> {
        let forward = self
            .server
            .handle_peer_datagram(relayed, peer, bytes, self.now);
        let mut commands: Vec<Command> =
            forward.map(|f| as_command(&f, bytes)).into_iter().collect();
        commands.extend(self.drain());
        commands
    }

    /// Runs the timers at the current time.
    pub(super) fn tick(&mut self) -> Vec<Command> {
        self.server.handle_timeout(self.now);
        self.drain()
    }

    /// Sends `bytes` and expects exactly one response: to this client, from its listener,
    /// carrying `tid`.
    #[track_caller]
    pub(super) fn transact(
        &mut self,
        client: &Client,
        bytes: &[u8],
        tid: TransactionId,
    ) -> Vec<u8> {
        let commands = self.client_sends(client, bytes);
        one_reply(commands, client, tid)
    }

    /// A signed request as a real client sends it: if the client has no nonce yet, the same
    /// request goes out unauthenticated first and must draw a 401 with REALM and NONCE.
    /// Returns the commands the signed request produced.
    #[track_caller]
    pub(super) fn signed_commands(
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
    pub(super) fn request(
        &mut self,
        client: &mut Client,
        method: Method,
        attrs: &[Attribute<'_>],
    ) -> Vec<u8> {
        let (tid, commands) = self.signed_commands(client, method, attrs);
        one_reply(commands, client, tid)
    }

    /// Sends the request unauthenticated and learns REALM/NONCE from the 401.
    #[track_caller]
    pub(super) fn challenge(
        &mut self,
        client: &mut Client,
        method: Method,
        attrs: &[Attribute<'_>],
    ) {
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
    pub(super) fn allocate(&mut self, client: &mut Client) -> (AllocationId, SocketAddr) {
        self.allocate_with(client, &[Attribute::RequestedTransport(UDP)])
    }

    #[track_caller]
    pub(super) fn allocate_with(
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
    pub(super) fn create_permission(&mut self, client: &mut Client, peers: &[SocketAddr]) {
        let attrs: Vec<Attribute<'_>> = peers
            .iter()
            .map(|p| Attribute::XorPeerAddress(*p))
            .collect();
        let reply = self.request(client, Method::CREATE_PERMISSION, &attrs);
        expect_success(&reply, Method::CREATE_PERMISSION, &client.key);
    }

    /// ChannelBind that must succeed; returns the commands besides the response.
    #[track_caller]
    pub(super) fn channel_bind(
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
    pub(super) fn refresh(&mut self, client: &mut Client, lifetime: Option<u32>) -> Vec<Command> {
        let attrs: Vec<Attribute<'_>> = lifetime.into_iter().map(Attribute::Lifetime).collect();
        let (tid, mut commands) = self.signed_commands(client, Method::REFRESH, &attrs);
        let last = commands.pop().expect("a response");
        let reply = one_reply(vec![last], client, tid);
        let msg = expect_success(&reply, Method::REFRESH, &client.key);
        assert!(msg.lifetime().is_some(), "Refresh success carries LIFETIME");
        commands
    }

    /// ChannelData from the client on `channel`.
    pub(super) fn channel_data(
        &mut self,
        client: &Client,
        channel: u16,
        data: &[u8],
    ) -> Vec<Command> {
        let bytes = ChannelData { channel, data }.encode(false);
        self.client_sends(client, &bytes)
    }

    /// A Send indication from the client.
    pub(super) fn send_indication(
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
pub(super) struct Client {
    pub(super) addr: SocketAddr,
    pub(super) listener: SocketAddr,
    /// UDP unless a test makes it a TCP/TLS client ([`Client::over`]).
    pub(super) transport: Transport,
    pub(super) username: String,
    pub(super) key: LongTermKey,
    pub(super) nonce: Option<String>,
    pub(super) next_tid: u64,
}

impl Client {
    pub(super) fn new(addr: &str, (username, password): (&str, &str)) -> Self {
        Self {
            addr: sa(addr),
            listener: listener(),
            transport: Transport::Udp,
            username: username.to_owned(),
            key: LongTermKey::derive(username, REALM, password),
            nonce: None,
            next_tid: 1,
        }
    }

    /// A TURN REST API client: `expiry:user` with `base64(HMAC-SHA1(secret, username))`.
    pub(super) fn rest(addr: &str, expiry: u64, user: &str) -> Self {
        let username = format!("{expiry}:{user}");
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(REST_SECRET.as_bytes()).expect("hmac");
        mac.update(username.as_bytes());
        let password = STANDARD.encode(mac.finalize().into_bytes());
        Self::new(addr, (username.as_str(), password.as_str()))
    }

    /// The same client over another transport (its messages then arrive framed from a stream).
    pub(super) fn over(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    pub(super) fn tid(&mut self) -> TransactionId {
        let n = self.next_tid;
        self.next_tid += 1;
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&0x7e57_c11e_u32.to_be_bytes());
        id[4..].copy_from_slice(&n.to_be_bytes());
        TransactionId(id)
    }

    /// A request with `attrs`, then (if `auth`) USERNAME, REALM, NONCE and MESSAGE-INTEGRITY,
    /// then FINGERPRINT.
    pub(super) fn build(
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
pub(super) fn one_reply(commands: Vec<Command>, client: &Client, tid: TransactionId) -> Vec<u8> {
    match commands.as_slice() {
        [Command::SendToClient {
            listener,
            client: to,
            transport,
            payload,
        }] => {
            assert_eq!(*listener, client.listener, "sent from the listener");
            assert_eq!(
                *transport, client.transport,
                "sent over the client's transport"
            );
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
pub(super) fn expect_success<'a>(
    bytes: &'a [u8],
    method: Method,
    key: &LongTermKey,
) -> Message<'a> {
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
pub(super) fn expect_error<'a>(
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
pub(super) fn expect_signed_error(bytes: &[u8], method: Method, code: u16, client: &Client) {
    expect_error(bytes, method, code, Some(&client.key));
}

pub(super) fn to_peer(relayed: SocketAddr, peer: SocketAddr, payload: &[u8]) -> Command {
    Command::SendToPeer {
        relayed,
        peer,
        payload: payload.to_vec(),
    }
}

pub(super) fn to_client(client: &Client, payload: Vec<u8>) -> Command {
    Command::SendToClient {
        listener: client.listener,
        client: client.addr,
        transport: client.transport,
        payload,
    }
}

pub(super) fn create_binding(
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
        transport: client.transport,
        relayed,
        peer,
        channel,
        expires_at,
    }
}

pub(super) fn delete_binding(
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
        transport: client.transport,
        relayed,
        peer,
        channel,
    }
}

/// Decodes a Data indication for `peer` and returns its DATA.
#[track_caller]
pub(super) fn data_indication(commands: &[Command], client: &Client, peer: SocketAddr) -> Vec<u8> {
    match commands {
        [Command::SendToClient {
            listener,
            client: to,
            transport,
            payload,
        }] => {
            assert_eq!(
                (*listener, *to, *transport),
                (client.listener, client.addr, client.transport)
            );
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
