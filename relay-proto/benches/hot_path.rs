//! Criterion benchmarks of the core's per-datagram work: ChannelData both ways through the
//! allocation lookup to a forwarding decision, on a server holding one allocation and one
//! holding 10,000 (the cost must not depend on it: lookups are hashed and expiry runs from a
//! deadline heap, never a scan), plus the STUN codec.
//!
//! `cargo bench -p relay-proto`. Figures are per datagram on one core; compare runs side by side.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{hint::black_box, time::Duration};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use relay_proto::{
    auth::LongTermKey,
    channel_data::ChannelData,
    stun::{Attribute, Class, Message, MessageBuilder, Method, TransactionId},
};
use support::Fixture;

/// Datagrams between two timer polls, as the daemon polls once per receive batch.
const BATCH: u64 = 32;

/// A flood of one flow's datagrams, as the daemon feeds them: a batch of 32 datagrams, then
/// the timers. Time moves 1 µs per datagram.
fn flood(c: &mut Criterion) {
    let mut group = c.benchmark_group("flood_120B");
    group.throughput(Throughput::Elements(BATCH));
    let message = Fixture::channel_data(120);
    let payload = vec![0x5a; 120];
    for allocations in [1usize, 10_000] {
        let mut f = Fixture::new(allocations);
        let flow = f.flows[allocations / 2];
        group.bench_function(BenchmarkId::new("client_to_peer", allocations), |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    let forward = f.server.handle_client_datagram(
                        flow.client,
                        f.listener,
                        black_box(&message),
                        f.now,
                    );
                    black_box(forward);
                    f.now += Duration::from_micros(1);
                }
                if f.server.poll_timeout().is_some_and(|at| at <= f.now) {
                    f.server.handle_timeout(f.now);
                }
            })
        });
        group.bench_function(BenchmarkId::new("peer_to_client", allocations), |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    let forward = f.server.handle_peer_datagram(
                        flow.relayed,
                        f.peer,
                        black_box(&payload),
                        f.now,
                    );
                    black_box(forward);
                    f.now += Duration::from_micros(1);
                }
                if f.server.poll_timeout().is_some_and(|at| at <= f.now) {
                    f.server.handle_timeout(f.now);
                }
            })
        });
    }
    group.finish();
}

fn request(method: Method, attrs: &[Attribute<'_>], key: &LongTermKey) -> Vec<u8> {
    let mut b = MessageBuilder::new(Class::Request, method, TransactionId([9; 12]));
    for a in attrs {
        b.add(a);
    }
    b.add(&Attribute::Username("alice"))
        .add(&Attribute::Realm("bench"))
        .add(&Attribute::Nonce("nonce-value-0123456789"));
    b.finish(Some(key.as_bytes()), true)
}

fn codec(c: &mut Criterion) {
    let key = LongTermKey::derive("alice", "bench", "secret");
    let refresh = request(Method::REFRESH, &[Attribute::Lifetime(600)], &key);
    let message = Fixture::channel_data(120);
    let mut group = c.benchmark_group("codec");
    group.bench_function("channel_data_decode", |bench| {
        bench.iter(|| ChannelData::decode(black_box(&message)).map(|m| m.data.len()))
    });
    group.bench_function("stun_decode_signed_refresh", |bench| {
        bench.iter(|| Message::decode(black_box(&refresh)).map(|m| m.attributes().len()))
    });
    group.bench_function("stun_decode_and_verify_integrity", |bench| {
        bench.iter(|| {
            let m = Message::decode(black_box(&refresh)).expect("valid");
            m.verify_integrity(key.as_bytes()).is_ok()
        })
    });
    group.bench_function("stun_encode_signed_refresh", |bench| {
        bench.iter(|| {
            request(
                Method::REFRESH,
                &[Attribute::Lifetime(600)],
                black_box(&key),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, flood, codec);
criterion_main!(benches);
