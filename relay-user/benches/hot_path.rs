//! Criterion benchmarks of the socket path's per-datagram work: the STUN codec, and ChannelData
//! from parse through the allocation lookup to the send queue, in both directions.
//!
//! `cargo bench -p relay-user`. Figures are per datagram on one core; compare runs side by side.

use std::{
    hint::black_box,
    net::SocketAddr,
    time::{Duration, Instant},
};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{rngs::StdRng, SeedableRng};
use relay::net::batch::Transmit;
use relay_proto::{
    auth::{Credentials, LongTermKey},
    channel_data::ChannelData,
    policy::PeerPolicy,
    server::{AllocationId, Command, Server, ServerConfig},
    stun::{Attribute, Class, Message, MessageBuilder, Method, TransactionId},
};

const REALM: &str = "bench";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// A server with one allocation and channel 0x4000 bound to a peer, driven through the real
/// request sequence.
struct Bound {
    server: Server<StdRng>,
    client: SocketAddr,
    listener: SocketAddr,
    relayed: SocketAddr,
    peer: SocketAddr,
    now: Instant,
}

fn request(
    method: Method,
    tid: u8,
    attrs: &[Attribute<'_>],
    auth: Option<(&str, &LongTermKey)>,
) -> Vec<u8> {
    let mut b = MessageBuilder::new(Class::Request, method, TransactionId([tid; 12]));
    for a in attrs {
        b.add(a);
    }
    match auth {
        Some((nonce, key)) => {
            b.add(&Attribute::Username("alice"))
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

fn bound() -> Bound {
    let mut credentials = Credentials::new(REALM);
    credentials.add_user("alice", "secret");
    let mut policy = PeerPolicy::safe_default();
    policy.allow("198.18.0.0/15".parse().expect("cidr"));
    let config = ServerConfig::new(
        REALM,
        vec!["198.18.2.1".parse().expect("ip")],
        credentials,
        policy,
    );
    let now = Instant::now();
    let mut server = Server::new(config, StdRng::seed_from_u64(7), now, 0);
    let (client, listener, peer) = (
        addr("198.18.1.2:40000"),
        addr("198.18.1.1:3478"),
        addr("198.18.2.2:9000"),
    );
    let allocate = [Attribute::RequestedTransport(17)];
    let _ = server.handle_client_datagram(
        client,
        listener,
        &request(Method::ALLOCATE, 1, &allocate, None),
        now,
    );
    let nonce = drain(&mut server)
        .into_iter()
        .find_map(|c| match c {
            Command::SendToClient { payload, .. } => Message::decode(&payload)
                .ok()
                .and_then(|m| m.nonce().map(str::to_owned)),
            _ => None,
        })
        .expect("401 with a nonce");
    let key = LongTermKey::derive("alice", REALM, "secret");
    let auth = Some((nonce.as_str(), &key));
    let _ = server.handle_client_datagram(
        client,
        listener,
        &request(Method::ALLOCATE, 2, &allocate, auth),
        now,
    );
    let (id, relayed): (AllocationId, SocketAddr) = drain(&mut server)
        .into_iter()
        .find_map(|c| match c {
            Command::CreateAllocation { id, relayed } => Some((id, relayed)),
            _ => None,
        })
        .expect("CreateAllocation");
    server.allocation_bound(id, now);
    let bind = [
        Attribute::ChannelNumber(0x4000),
        Attribute::XorPeerAddress(peer),
    ];
    let _ = server.handle_client_datagram(
        client,
        listener,
        &request(Method::CHANNEL_BIND, 3, &bind, auth),
        now,
    );
    let bound = drain(&mut server)
        .iter()
        .any(|c| matches!(c, Command::CreateChannelBinding { .. }));
    assert!(bound, "channel bound");
    Bound {
        server,
        client,
        listener,
        relayed,
        peer,
        now: now + Duration::from_millis(1),
    }
}

/// Moves the server's sends into a send queue, as the daemon's worker does.
fn queue(server: &mut Server<StdRng>, outbox: &mut Vec<Transmit>) {
    while let Some(command) = server.next_command() {
        match command {
            Command::SendToPeer { peer, payload, .. } => outbox.push(Transmit {
                to: peer,
                src: None,
                payload,
            }),
            Command::SendToClient {
                client, payload, ..
            } => outbox.push(Transmit {
                to: client,
                src: None,
                payload,
            }),
            _ => {}
        }
    }
}

fn hot_path(c: &mut Criterion) {
    for size in [120usize, 1200] {
        let mut group = c.benchmark_group(format!("channel_data_{size}B"));
        group.throughput(Throughput::Elements(1));
        let payload = vec![0x5a; size];
        let message = ChannelData {
            channel: 0x4000,
            data: &payload,
        }
        .encode(false);

        let mut b = bound();
        let mut outbox = Vec::with_capacity(64);
        group.bench_function("client_to_peer", |bench| {
            bench.iter(|| {
                let forward = b.server.handle_client_datagram(
                    b.client,
                    b.listener,
                    black_box(&message),
                    b.now,
                );
                black_box(forward);
                queue(&mut b.server, &mut outbox);
                outbox.clear();
            })
        });
        group.bench_function("peer_to_client", |bench| {
            bench.iter(|| {
                let forward =
                    b.server
                        .handle_peer_datagram(b.relayed, b.peer, black_box(&payload), b.now);
                black_box(forward);
                queue(&mut b.server, &mut outbox);
                outbox.clear();
            })
        });
        group.bench_function("parse_only", |bench| {
            bench.iter(|| ChannelData::decode(black_box(&message)).map(|m| m.data.len()))
        });
        group.finish();
    }
}

fn codec(c: &mut Criterion) {
    let key = LongTermKey::derive("alice", REALM, "secret");
    let refresh = request(
        Method::REFRESH,
        9,
        &[Attribute::Lifetime(600)],
        Some(("nonce-value-0123456789", &key)),
    );
    let mut group = c.benchmark_group("stun");
    group.bench_function("decode_signed_refresh", |bench| {
        bench.iter(|| Message::decode(black_box(&refresh)).map(|m| m.attributes().len()))
    });
    group.bench_function("decode_and_verify_integrity", |bench| {
        bench.iter(|| {
            let m = Message::decode(black_box(&refresh)).expect("valid");
            m.verify_integrity(key.as_bytes()).is_ok()
        })
    });
    group.bench_function("encode_signed_refresh", |bench| {
        bench.iter(|| {
            request(
                Method::REFRESH,
                9,
                &[Attribute::Lifetime(600)],
                Some(("nonce-value-0123456789", black_box(&key))),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path, codec);
criterion_main!(benches);
