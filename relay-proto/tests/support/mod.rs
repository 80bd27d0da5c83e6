//! A server holding many allocations, each with channel 0x4000 bound to one peer, set up
//! through the real request sequence (401 challenge, signed Allocate, bind notification,
//! ChannelBind). Shared by the allocation-counting test and the criterion benchmarks.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use rand::{rngs::StdRng, SeedableRng};
use relay_proto::{
    auth::{Credentials, LongTermKey},
    channel_data::ChannelData,
    policy::PeerPolicy,
    server::{AllocationId, Command, Server, ServerConfig},
    stun::{Attribute, Class, Message, MessageBuilder, Method, TransactionId},
};

const REALM: &str = "bench";
const USER: &str = "alice";
const PASSWORD: &str = "secret";
/// The channel every flow binds.
pub const CHANNEL: u16 = 0x4000;

/// One allocation's 5-tuple and relayed address.
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub client: SocketAddr,
    pub relayed: SocketAddr,
}

pub struct Fixture {
    pub server: Server<StdRng>,
    pub listener: SocketAddr,
    pub peer: SocketAddr,
    pub flows: Vec<Flow>,
    pub now: Instant,
}

fn request(
    method: Method,
    tid: u32,
    attrs: &[Attribute<'_>],
    auth: Option<(&str, &LongTermKey)>,
) -> Vec<u8> {
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&tid.to_be_bytes());
    let mut b = MessageBuilder::new(Class::Request, method, TransactionId(id));
    for a in attrs {
        b.add(a);
    }
    match auth {
        Some((nonce, key)) => {
            b.add(&Attribute::Username(USER))
                .add(&Attribute::Realm(REALM))
                .add(&Attribute::Nonce(nonce));
            b.finish(Some(key.as_bytes()), true)
        }
        None => b.finish(None, true),
    }
}

fn drain(server: &mut Server<StdRng>) -> Vec<Command> {
    std::iter::from_fn(|| server.next_command()).collect()
}

/// Client `i`'s address: one IP per client (the unauthenticated rate limit is per IP).
fn client_addr(i: usize) -> SocketAddr {
    let i = u32::try_from(i).expect("few clients");
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i);
    SocketAddr::new(IpAddr::V4(ip), 40_000)
}

impl Fixture {
    /// A server with `allocations` allocations (at most the 16384 ports of the default range).
    pub fn new(allocations: usize) -> Self {
        let mut credentials = Credentials::new(REALM);
        credentials.add_user(USER, PASSWORD);
        let mut policy = PeerPolicy::safe_default();
        policy.allow("198.18.0.0/15".parse().expect("cidr"));
        let mut config = ServerConfig::new(
            REALM,
            vec!["198.18.2.1".parse().expect("ip")],
            credentials,
            policy,
        );
        config.max_allocations = usize::MAX;
        config.max_allocations_per_user = usize::MAX;
        let now = Instant::now();
        let mut server = Server::new(config, StdRng::seed_from_u64(7), now, 0);
        let listener: SocketAddr = "198.18.1.1:3478".parse().expect("addr");
        let peer: SocketAddr = "198.18.2.2:9000".parse().expect("addr");
        let key = LongTermKey::derive(USER, REALM, PASSWORD);
        let allocate = [Attribute::RequestedTransport(17)];
        let bind = [
            Attribute::ChannelNumber(CHANNEL),
            Attribute::XorPeerAddress(peer),
        ];
        let mut flows = Vec::with_capacity(allocations);
        for i in 0..allocations {
            let client = client_addr(i);
            let tid = u32::try_from(i).expect("few clients") * 4;
            let challenge = request(Method::ALLOCATE, tid, &allocate, None);
            assert!(server
                .handle_client_datagram(client, listener, &challenge, now)
                .is_none());
            let nonce = drain(&mut server)
                .into_iter()
                .find_map(|c| match c {
                    Command::SendToClient { payload, .. } => Message::decode(&payload)
                        .ok()
                        .and_then(|m| m.nonce().map(str::to_owned)),
                    _ => None,
                })
                .expect("401 with a nonce");
            let auth = Some((nonce.as_str(), &key));
            let signed = request(Method::ALLOCATE, tid + 1, &allocate, auth);
            assert!(server
                .handle_client_datagram(client, listener, &signed, now)
                .is_none());
            let (id, relayed): (AllocationId, SocketAddr) = drain(&mut server)
                .into_iter()
                .find_map(|c| match c {
                    Command::CreateAllocation { id, relayed } => Some((id, relayed)),
                    _ => None,
                })
                .expect("CreateAllocation");
            server.allocation_bound(id, now);
            let channel_bind = request(Method::CHANNEL_BIND, tid + 2, &bind, auth);
            assert!(server
                .handle_client_datagram(client, listener, &channel_bind, now)
                .is_none());
            let bound = drain(&mut server)
                .iter()
                .any(|c| matches!(c, Command::CreateChannelBinding { .. }));
            assert!(bound, "channel bound for flow {i}");
            flows.push(Flow { client, relayed });
        }
        Self {
            server,
            listener,
            peer,
            flows,
            now: now + Duration::from_millis(1),
        }
    }

    /// A ChannelData message of `size` bytes of data on [`CHANNEL`].
    pub fn channel_data(size: usize) -> Vec<u8> {
        ChannelData {
            channel: CHANNEL,
            data: &vec![0x5a; size],
        }
        .encode(false)
    }
}
