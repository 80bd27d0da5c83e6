//! `relay serve` with wildcard listeners (0.0.0.0, [::]) on loopback.
//!
//! RFC 8656 §2 puts the server address the client contacted into the 5-tuple: every answer
//! must come from that address, and the allocation records it (`relay ctl allocations`). All of
//! 127/8 is local, so 127.0.0.2 and 127.0.0.3 stand in for two addresses of a multi-homed host;
//! without IP_PKTINFO the relay would answer both from 127.0.0.1 (the route's choice).
//!
//! The echo peer lives on 127.0.0.4, which `--allow-peer-unsafe 127.0.0.4` admits (the relay's own
//! addresses stay denied whatever is allowed).

mod support;

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use relay::proto::{
    channel_data::ChannelData,
    stun::{Attribute, Class, Message, Method},
};
use support::{client::Client, free_udp_port, Relay};

const REALM: &str = "relay.local";
const PEER_IP: &str = "127.0.0.4";

/// A UDP echo server on the peer address, stopped on drop.
struct Echo {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    fn start() -> Self {
        let socket = UdpSocket::bind((PEER_IP, 0)).expect("echo socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let addr = socket.local_addr().expect("echo address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        Self {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `relay serve` on `listen` with two workers (so SO_REUSEPORT spreads clients), waiting for
/// one listener line per address.
fn start(listen: &[&str]) -> Relay {
    let mut args = Vec::new();
    for addr in listen {
        args.extend(["--listen", addr]);
    }
    args.extend([
        "--relay-ip",
        "127.0.0.1",
        "--realm",
        REALM,
        "--allow-peer-unsafe",
        PEER_IP,
        "--user",
        "alice:wonderland",
        "--workers",
        "2",
        "--log-level",
        "info",
    ]);
    Relay::start_with(&[], &args, listen.len())
}

/// A client on `local` that contacts the relay at `server`, allocates, binds `channel` to the
/// echo peer and relays a datagram through it; asserts that every answer (401, Allocate and
/// ChannelBind success, the relayed echo) comes from `server`. Returns the client's address.
fn relay_through(
    relay: &Relay,
    server: SocketAddr,
    local: &str,
    channel: u16,
    echo: &Echo,
) -> SocketAddr {
    let socket = UdpSocket::bind((local, 0)).expect("client socket");
    let client_addr = socket.local_addr().expect("client address");
    let mut client = Client::with_socket(socket, server, REALM);
    let log = || relay.log();

    let (answer, from) =
        client.request_from(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    let msg = Message::decode(&answer).expect("a STUN answer");
    assert_eq!(msg.error_code(), Some(401));
    assert_eq!(from, server, "the 401 came from elsewhere\n{}", log());

    client.login("alice", "wonderland");
    let (answer, from) =
        client.request_from(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    let relayed = Message::decode(&answer)
        .ok()
        .and_then(|m| m.xor_relayed_address());
    assert!(relayed.is_some(), "Allocate via {server} failed\n{}", log());
    assert_eq!(from, server, "the Allocate success came from elsewhere");

    let (answer, from) = client.request_from(
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(channel),
            Attribute::XorPeerAddress(echo.addr),
        ],
    );
    let class = Message::decode(&answer).map(|m| m.class());
    assert_eq!(
        class,
        Ok(Class::Success),
        "ChannelBind via {server}\n{}",
        log()
    );
    assert_eq!(from, server, "the ChannelBind success came from elsewhere");

    // Client → relay → echo peer → relay → client, over the socket path.
    let payload = format!("through {server}");
    let message = ChannelData {
        channel,
        data: payload.as_bytes(),
    }
    .encode(true);
    let mut echoed = None;
    for _ in 0..5 {
        client.send_raw(&message);
        while let Some((datagram, from)) = client.recv_from() {
            if let Ok(data) = ChannelData::decode(&datagram) {
                echoed = Some((data.channel, data.data.to_vec(), from));
                break;
            }
        }
        if echoed.is_some() {
            break;
        }
    }
    let (got_channel, data, from) =
        echoed.unwrap_or_else(|| panic!("no echo through {server}\n{}", log()));
    assert_eq!((got_channel, data), (channel, payload.into_bytes()));
    assert_eq!(from, server, "relayed data came from elsewhere");
    client_addr
}

/// `relay ctl allocations --json` records each client with the listener address it contacted,
/// and the table shows it too.
fn assert_listeners(relay: &Relay, expected: &[(SocketAddr, SocketAddr)]) {
    let list = relay.allocations();
    let mut got: Vec<(String, String)> = list
        .allocations
        .iter()
        .map(|a| (a.client.clone(), a.listener.clone()))
        .collect();
    got.sort();
    let mut want: Vec<(String, String)> = expected
        .iter()
        .map(|(client, listener)| (client.to_string(), listener.to_string()))
        .collect();
    want.sort();
    assert_eq!(got, want);

    let (ok, table, stderr) = relay.ctl(&["allocations"]);
    assert!(ok, "{stderr}");
    assert!(table.contains("LISTENER"), "{table}");
    for (_, listener) in expected {
        assert!(table.contains(&listener.to_string()), "{table}");
    }
    assert!(
        !table.contains("0.0.0.0:") && !table.contains("[::]:"),
        "{table}"
    );
}

#[test]
fn ipv4_wildcard_answers_from_each_contacted_address() {
    let echo = Echo::start();
    let relay = start(&["0.0.0.0:0"]);
    let wildcard = relay.listener();
    assert!(wildcard.ip().is_unspecified(), "{wildcard}");
    assert!(
        relay.log().contains(&format!(
            "listening on udp {wildcard} (all IPv4 addresses; replies leave from the address \
             each client contacted)"
        )),
        "{}",
        relay.log()
    );
    let via_2 = SocketAddr::from(([127, 0, 0, 2], wildcard.port()));
    let via_3 = SocketAddr::from(([127, 0, 0, 3], wildcard.port()));
    let a = relay_through(&relay, via_2, "127.0.0.1", 0x4000, &echo);
    let b = relay_through(&relay, via_3, "127.0.0.1", 0x4001, &echo);
    // One more client per address, so with two workers both reuseport sockets likely serve.
    let c = relay_through(&relay, via_2, "127.0.0.1", 0x4002, &echo);
    let d = relay_through(&relay, via_3, "127.0.0.1", 0x4003, &echo);
    assert_listeners(&relay, &[(a, via_2), (b, via_3), (c, via_2), (d, via_3)]);
}

/// A specific address and the wildcard on the same port: the kernel delivers 127.0.0.2 to the
/// socket bound on it and everything else to the wildcard socket; both answer from the
/// contacted address.
#[test]
fn specific_and_wildcard_listeners_share_a_port() {
    let echo = Echo::start();
    let port = free_udp_port("0.0.0.0");
    let specific = format!("127.0.0.2:{port}");
    let any = format!("0.0.0.0:{port}");
    let relay = start(&[&specific, &any]);
    let mut listeners = relay.listeners.clone();
    listeners.sort();
    let mut want: Vec<SocketAddr> = [&any, &specific]
        .iter()
        .map(|a| a.parse().expect("addr"))
        .collect();
    want.sort();
    assert_eq!(listeners, want, "{}", relay.log());
    let via_2 = SocketAddr::from(([127, 0, 0, 2], port));
    let via_3 = SocketAddr::from(([127, 0, 0, 3], port));
    let a = relay_through(&relay, via_2, "127.0.0.1", 0x4000, &echo);
    let b = relay_through(&relay, via_3, "127.0.0.1", 0x4001, &echo);
    assert_listeners(&relay, &[(a, via_2), (b, via_3)]);
}

/// `[::]` (v6-only) with the one IPv6 loopback address; the relayed address stays IPv4.
#[test]
fn ipv6_wildcard_answers_from_the_contacted_address() {
    let echo = Echo::start();
    let relay = start(&["[::]:0"]);
    let wildcard = relay.listener();
    assert!(wildcard.ip().is_unspecified(), "{wildcard}");
    assert!(
        relay.log().contains("(all IPv6 addresses;"),
        "{}",
        relay.log()
    );
    let via = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, wildcard.port()));
    let a = relay_through(&relay, via, "::1", 0x4000, &echo);
    assert_listeners(&relay, &[(a, via)]);
}
