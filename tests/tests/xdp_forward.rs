//! Real traffic through the kernel fast path: a client and a peer namespace exchange datagrams
//! through the relay namespace, where only the kernel program (no TURN server) forwards them.
//!
//! The client sends ChannelData to the listener address and the peer receives the bare data
//! from the relayed address; the peer answers to the relayed address and the client receives
//! ChannelData from the listener. After `remove_channel` the same datagrams reach plain
//! userspace sockets bound in the relay namespace instead.

use std::{
    io::ErrorKind,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use relay::fastpath::{AttachMode, ChannelBinding, FastPath};
use relay_common::Reason;
use relay_tests::{
    enter_netns,
    fastpath::{lab_policy, Installer},
    lab::ThreeHosts,
    packet::channel_data,
    require_root,
};

const DATAGRAMS: u64 = 300;
const AFTER_REMOVAL: usize = 5;
const CHANNEL: u16 = 0x4001;
const ALLOCATION: u64 = 4_242;

struct Addresses {
    client: SocketAddr,
    listener: SocketAddr,
    relayed: SocketAddr,
    peer: SocketAddr,
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

fn bind(ns_path: &str, at: SocketAddr) -> UdpSocket {
    // A socket stays in the namespace it was created in, whichever thread uses it later.
    enter_netns(ns_path);
    let socket = UdpSocket::bind(at).unwrap_or_else(|e| panic!("bind {at}: {e}"));
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("read timeout");
    socket
}

/// Receives one datagram; `None` after the socket's read timeout.
fn recv(socket: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => Some((buf[..n].to_vec(), from)),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => None,
        Err(e) => panic!("recv: {e}"),
    }
}

fn forward_both_ways(addresses: Addresses, mode: AttachMode) {
    require_root();
    let lab = ThreeHosts::new();
    // No host reconfiguration: the relay is not a router, and the fast path must not need one.
    lab.force_forwarding_off();
    lab.add_static_neighbours();
    assert!(
        !lab.client_reaches_peer(),
        "the client must not reach the peer except through the relay"
    );
    let ns = |n: &relay_tests::Netns| format!("/run/netns/{}", n.name());
    let (client_ns, relay_ns, peer_ns) = (ns(&lab.client), ns(&lab.relay), ns(&lab.peer));
    let (client_if, peer_if) = (lab.client_if.clone(), lab.peer_if.clone());
    let (relay_client_if, relay_peer_if) = (lab.relay_client_if.clone(), lab.relay_peer_if.clone());

    // One thread does everything, moving between namespaces: attach where each device lives,
    // create each socket in its host's namespace. The namespaces outlive it (`lab`).
    let driver = std::thread::spawn(move || {
        let mut fastpath = FastPath::load().unwrap_or_else(|e| panic!("load: {e}"));
        enter_netns(&client_ns);
        fastpath
            .attach_pass(&client_if)
            .expect("XDP_PASS on the client's veth end");
        let client = bind(&client_ns, addresses.client);
        enter_netns(&peer_ns);
        fastpath
            .attach_pass(&peer_if)
            .expect("XDP_PASS on the peer's veth end");
        let peer = bind(&peer_ns, addresses.peer);
        enter_netns(&relay_ns);
        for dev in [&relay_client_if, &relay_peer_if] {
            fastpath
                .attach(dev, mode)
                .unwrap_or_else(|e| panic!("attach {dev}: {e}"));
        }
        // The socket path's sockets: bound all along, as in the daemon, so nothing the kernel
        // passes ends in an ICMP error.
        let listener = bind(&relay_ns, addresses.listener);
        let relayed = bind(&relay_ns, addresses.relayed);

        let binding = ChannelBinding {
            allocation: ALLOCATION,
            client: addresses.client,
            listener: addresses.listener,
            relayed: addresses.relayed,
            peer: addresses.peer,
            channel: CHANNEL,
            expires_at: Instant::now() + Duration::from_secs(120),
        };
        fastpath
            .set_peer_policy(&lab_policy())
            .expect("kernel peer policy");
        Installer::new(&fastpath).install(&mut fastpath, &binding, false);

        // Client → peer: ChannelData with 0..=3 padding bytes; the peer gets the bare data.
        let mut to_peer_bytes = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..DATAGRAMS {
            assert!(Instant::now() < deadline, "client -> peer took too long");
            let data = format!("client datagram {i:04}{}", "x".repeat((i % 5) as usize));
            let padding = (4 - data.len() % 4) % 4 * (i as usize % 2);
            let message = channel_data(CHANNEL, data.as_bytes(), padding);
            client.send_to(&message, addresses.listener).expect("send");
            let (got, from) =
                recv(&peer).unwrap_or_else(|| panic!("datagram {i} did not reach the peer"));
            assert_eq!(from, addresses.relayed, "datagram {i} source");
            assert_eq!(got, data.as_bytes(), "datagram {i} payload");
            to_peer_bytes += data.len() as u64;
        }

        // Peer → client: bare data; the client gets ChannelData from the listener.
        let mut to_client_bytes = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        for i in 0..DATAGRAMS {
            assert!(Instant::now() < deadline, "peer -> client took too long");
            let data = format!("peer datagram {i:04}{}", "y".repeat((i % 7) as usize));
            peer.send_to(data.as_bytes(), addresses.relayed)
                .expect("send");
            let (got, from) =
                recv(&client).unwrap_or_else(|| panic!("datagram {i} did not reach the client"));
            assert_eq!(from, addresses.listener, "datagram {i} source");
            assert_eq!(
                got,
                channel_data(CHANNEL, data.as_bytes(), 0),
                "datagram {i}"
            );
            to_client_bytes += data.len() as u64;
        }

        let counters = fastpath.counters(ALLOCATION as u32).expect("counters");
        assert_eq!(counters.to_peer_packets, DATAGRAMS, "{counters:?}");
        assert_eq!(counters.to_peer_bytes, to_peer_bytes, "{counters:?}");
        assert_eq!(counters.to_client_packets, DATAGRAMS, "{counters:?}");
        assert_eq!(counters.to_client_bytes, to_client_bytes, "{counters:?}");

        // Without the binding the kernel forwards nothing: the relay's own sockets get it all.
        fastpath.remove_channel(&binding).expect("remove");
        for i in 0..AFTER_REMOVAL {
            let message = channel_data(CHANNEL, format!("late {i}").as_bytes(), 0);
            client.send_to(&message, addresses.listener).expect("send");
            let (got, from) = recv(&listener).expect("the listener socket gets ChannelData");
            assert_eq!((got, from), (message, addresses.client));
            let data = format!("late reply {i}");
            peer.send_to(data.as_bytes(), addresses.relayed)
                .expect("send");
            let (got, from) = recv(&relayed).expect("the relayed socket gets the peer's data");
            assert_eq!((got.as_slice(), from), (data.as_bytes(), addresses.peer));
        }
        for socket in [&client, &peer] {
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            assert!(recv(socket).is_none(), "the kernel forwarded after removal");
        }
        let counters = fastpath.counters(ALLOCATION as u32).expect("counters");
        assert_eq!(
            (counters.to_peer_packets, counters.to_client_packets),
            (DATAGRAMS, DATAGRAMS),
            "counters moved after removal"
        );
        fastpath.verdict_counters().expect("verdict counters")
    });
    let verdicts = driver
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    println!("verdict counters: {verdicts:?}");
    let count = |reason: Reason| verdicts.iter().find(|v| v.0 == reason).map_or(0, |v| v.1);
    assert_eq!(count(Reason::ForwardToPeer), DATAGRAMS);
    assert_eq!(count(Reason::ForwardToClient), DATAGRAMS);
    assert_eq!(count(Reason::PassNoBinding), AFTER_REMOVAL as u64);
    assert_eq!(count(Reason::DropRewriteFailed), 0);

    // Every rewritten checksum verified on arrival (IPv4 and IPv6 keep separate counters).
    for (who, ns) in [
        ("client", &lab.client),
        ("peer", &lab.peer),
        ("relay", &lab.relay),
    ] {
        assert_eq!(
            ns.udp_counter("InCsumErrors"),
            0,
            "{who}: UDP checksum errors"
        );
        assert_eq!(ns.udp_counter("InErrors"), 0, "{who}: UDP input errors");
        assert_eq!(
            ns.snmp6_counter("Udp6InCsumErrors"),
            0,
            "{who}: UDP6 checksum errors"
        );
        assert_eq!(
            ns.snmp6_counter("Udp6InErrors"),
            0,
            "{who}: UDP6 input errors"
        );
    }
    // Client and peer received every datagram; the relay's stack only what came after the
    // removal.
    let received = |ns: &relay_tests::Netns| {
        ns.udp_counter("InDatagrams") + ns.snmp6_counter("Udp6InDatagrams")
    };
    assert_eq!(received(&lab.client), DATAGRAMS, "client");
    assert_eq!(received(&lab.peer), DATAGRAMS, "peer");
    assert_eq!(
        received(&lab.relay),
        2 * AFTER_REMOVAL as u64,
        "datagrams that reached the relay's sockets"
    );

    // Dropping the fast path detached everything (XDP, TCX and cls_bpf show up here).
    for ns in [&lab.client, &lab.relay, &lab.peer] {
        let shown = ns.exec("bpftool", &["net", "show"]);
        let shown = String::from_utf8_lossy(&shown.stdout);
        assert!(!shown.contains("relay_"), "still attached: {shown}");
    }
}

fn v4() -> Addresses {
    Addresses {
        client: addr("198.18.1.2:40000"),
        listener: addr("198.18.1.1:3478"),
        relayed: addr("198.18.2.1:50000"),
        peer: addr("198.18.2.2:9000"),
    }
}

fn v6() -> Addresses {
    Addresses {
        client: addr("[2001:2:0:1::2]:40000"),
        listener: addr("[2001:2:0:1::1]:3478"),
        relayed: addr("[2001:2:0:2::1]:50000"),
        peer: addr("[2001:2:0:2::2]:9000"),
    }
}

#[test]
fn xdp_forwards_ipv4_both_ways() {
    forward_both_ways(v4(), AttachMode::XdpNative);
}

#[test]
fn xdp_forwards_ipv6_both_ways() {
    forward_both_ways(v6(), AttachMode::XdpNative);
}

#[test]
fn xdp_generic_forwards_ipv4_both_ways() {
    forward_both_ways(v4(), AttachMode::XdpGeneric);
}

#[test]
fn tc_forwards_ipv4_both_ways() {
    forward_both_ways(v4(), AttachMode::Tc);
}

#[test]
fn tc_forwards_ipv6_both_ways() {
    forward_both_ways(v6(), AttachMode::Tc);
}
