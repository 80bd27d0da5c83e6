//! The per-user bandwidth limit (issue 12 item 3) on the socket path, with the real binary on
//! loopback: a client flooding ChannelData at about five times `--user-bandwidth` gets the
//! limit (plus the burst) delivered to its peer, the excess is dropped and counted, and another
//! user sending under the limit at the same time loses nothing.
//!
//! The flood is bounded (a fixed number of datagrams over about two seconds) and goes to
//! 127.0.0.2 only.

mod support;

use std::{
    net::{SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use relay::proto::channel_data::ChannelData;
use support::{client::Client, Relay};

const REALM: &str = "relay.local";
const PEER_IP: &str = "127.0.0.2";
/// Bytes per second per user, and the burst.
const LIMIT: u64 = 100_000;
const BURST: u64 = 20_000;
const PAYLOAD: usize = 1000;

/// A peer socket on 127.0.0.2 counting the bytes it receives until `until`.
fn counting_peer(until: Instant) -> (SocketAddr, thread::JoinHandle<u64>) {
    let socket = UdpSocket::bind((PEER_IP, 0)).expect("peer socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let addr = socket.local_addr().expect("peer address");
    let handle = thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut bytes = 0u64;
        while Instant::now() < until {
            if let Ok(n) = socket.recv(&mut buf) {
                bytes += n as u64;
            }
        }
        bytes
    });
    (addr, handle)
}

/// Sends `count` ChannelData messages of [`PAYLOAD`] bytes on 0x4000 spread over `over`.
fn paced(client: &Client, count: u64, over: Duration) {
    let message = ChannelData {
        channel: 0x4000,
        data: &[0x5a; PAYLOAD],
    }
    .encode(false);
    let start = Instant::now();
    for i in 0..count {
        // Datagram i leaves at its share of the interval.
        let due = start + over.mul_f64(i as f64 / count as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        client.send_raw(&message);
    }
}

#[test]
fn a_flooding_user_gets_the_limit_and_another_user_is_unaffected() {
    let limit = LIMIT.to_string();
    let burst = BURST.to_string();
    let relay = Relay::start(&[
        "--listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--realm",
        REALM,
        "--allow-peer-unsafe",
        PEER_IP,
        "--user",
        "alice:wonderland",
        "--user",
        "bob:builder",
        "--workers",
        "2",
        "--user-bandwidth",
        &limit,
        "--user-bandwidth-burst",
        &burst,
        "--log-level",
        "warn,relay=info",
    ]);
    let flood = Duration::from_secs(2);
    let until = Instant::now() + flood + Duration::from_secs(3);
    let (alice_peer, alice_count) = counting_peer(until);
    let (bob_peer, bob_count) = counting_peer(until);
    let mut alice = Client::new(relay.listener(), REALM);
    alice.login("alice", "wonderland");
    alice.allocate();
    alice.bind_channel(0x4000, alice_peer);
    let mut bob = Client::new(relay.listener(), REALM);
    bob.login("bob", "builder");
    bob.allocate();
    bob.bind_channel(0x4000, bob_peer);

    // Alice offers 500 kB/s (five times the limit), Bob 25 kB/s, at the same time.
    let sent_by_bob = 50u64;
    let started = Instant::now();
    let bob_thread = thread::spawn(move || {
        paced(&bob, sent_by_bob, Duration::from_secs(2));
        bob
    });
    let offered = 1000u64;
    paced(&alice, offered, flood);
    let elapsed = started.elapsed();
    let _bob = bob_thread.join().expect("bob");
    let alice_bytes = alice_count.join().expect("alice peer");
    let bob_bytes = bob_count.join().expect("bob peer");

    // Delivered: at most the rate over the flood plus the burst (and one datagram of debt),
    // and most of that: the limit throttles, it does not cut the user off.
    // 100 ms of slack: the relay may read the last datagrams a little after they were sent.
    let ceiling = LIMIT as f64 * (elapsed.as_secs_f64() + 0.1) + BURST as f64 + PAYLOAD as f64;
    let floor = LIMIT as f64 * flood.as_secs_f64() * 0.7;
    eprintln!(
        "alice offered {} B in {elapsed:?}, delivered {alice_bytes} B (ceiling {ceiling:.0}); \
         bob delivered {bob_bytes} B",
        offered * PAYLOAD as u64
    );
    assert!(
        (alice_bytes as f64) <= ceiling,
        "delivered {alice_bytes} B, more than the limit allows ({ceiling:.0})"
    );
    assert!(
        (alice_bytes as f64) >= floor,
        "delivered {alice_bytes} B, far below the limit ({floor:.0})"
    );
    // Bob stays under the limit: every datagram arrives.
    assert_eq!(bob_bytes, sent_by_bob * PAYLOAD as u64);
    // The drops are counted, without user labels.
    let dropped = relay.metric("relay_bandwidth_dropped_total{direction=\"to_peer\"}");
    let dropped_bytes = relay.metric("relay_bandwidth_dropped_bytes_total{direction=\"to_peer\"}");
    assert_eq!(dropped_bytes, dropped * PAYLOAD as u64);
    // What the relay admitted is bounded like what arrived, so the rest was dropped.
    let admitted_at_most = (ceiling / PAYLOAD as f64).ceil() as u64;
    assert!(
        dropped >= offered - admitted_at_most && dropped + alice_bytes / PAYLOAD as u64 <= offered,
        "{dropped} dropped, {} delivered, {offered} offered",
        alice_bytes / PAYLOAD as u64
    );
}
