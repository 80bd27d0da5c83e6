//! The receive arena and the send queue against real sockets on loopback.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::Mutex,
};

use super::{
    batch::{probe_gso, set_gso_for_test},
    recv::{Arena, Datagram, HEADROOM},
    send::SendQueue,
};

/// Tests that switch GSO on and off take turns, so a pass "with GSO" really has it.
static GSO_SWITCH: Mutex<()> = Mutex::new(());

fn gso_switch() -> std::sync::MutexGuard<'static, ()> {
    GSO_SWITCH.lock().unwrap_or_else(|e| e.into_inner())
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

/// Waits up to two seconds for `socket` to be readable.
fn wait_readable(socket: &UdpSocket) {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
    assert_eq!(n, 1, "datagrams did not arrive");
}

/// Receives until `want` datagrams arrived on `socket`: (source, destination, payload).
fn receive(
    arena: &mut Arena,
    socket: &UdpSocket,
    want: usize,
) -> Vec<(SocketAddr, Option<IpAddr>, Vec<u8>)> {
    let mut got = Vec::new();
    let mut out: Vec<Datagram> = Vec::new();
    while got.len() < want {
        wait_readable(socket);
        arena.clear();
        out.clear();
        arena.recv(socket.as_raw_fd(), &mut out).expect("recvmmsg");
        got.extend(
            out.iter()
                .map(|d| (d.from, d.to, arena.bytes()[d.range()].to_vec())),
        );
    }
    got
}

/// Sources of the next `want` datagrams on a plain client socket.
fn sources(socket: &UdpSocket, want: usize) -> Vec<SocketAddr> {
    let mut buf = vec![0u8; 2048];
    (0..want)
        .map(|_| {
            wait_readable(socket);
            socket.recv_from(&mut buf).expect("recv_from").1
        })
        .collect()
}

/// A client socket without GRO, so every datagram is read (and its source seen) alone.
fn client(at: &str) -> UdpSocket {
    let socket = UdpSocket::bind(addr(at)).expect("bind client");
    socket.set_nonblocking(true).expect("nonblocking");
    socket
}

fn queue_burst(
    q: &mut SendQueue,
    to: SocketAddr,
    src: Option<IpAddr>,
    count: usize,
    len: usize,
    byte: u8,
) {
    for _ in 0..count {
        q.push_owned(0, to, src, vec![byte; len]);
    }
}

fn flush(q: &mut SendQueue, socket: &UdpSocket) -> usize {
    let fd = socket.as_raw_fd();
    q.flush(&[], |_| Some(fd))
}

#[test]
fn plan_groups_same_destination_and_size() {
    let mut q = SendQueue::default();
    let (a, b) = (addr("198.18.0.1:1"), addr("198.18.0.2:1"));
    queue_burst(&mut q, a, None, 2, 100, 1);
    queue_burst(&mut q, a, None, 1, 60, 1);
    queue_burst(&mut q, a, None, 1, 100, 1);
    queue_burst(&mut q, b, None, 1, 100, 1);
    assert_eq!(q.plan(true, &[]), vec![(3, 100), (1, 100), (1, 100)]);
    assert_eq!(q.plan(false, &[]).len(), 5);
}

#[test]
fn plan_never_joins_datagrams_from_different_sources() {
    let mut q = SendQueue::default();
    let to = addr("198.18.0.1:1");
    queue_burst(&mut q, to, None, 2, 100, 1);
    queue_burst(&mut q, to, Some(ip("198.18.0.9")), 2, 100, 1);
    queue_burst(&mut q, to, Some(ip("198.18.0.8")), 1, 100, 1);
    assert_eq!(q.plan(true, &[]), vec![(2, 100), (2, 100), (1, 100)]);
}

#[test]
fn plan_leaves_datagrams_larger_than_an_mtu_alone() {
    let mut q = SendQueue::default();
    queue_burst(&mut q, addr("198.18.0.1:1"), None, 4, 2000, 1);
    assert!(q.plan(true, &[]).iter().all(|(count, _)| *count == 1));
}

#[test]
fn plan_respects_segment_limits() {
    let mut q = SendQueue::default();
    queue_burst(&mut q, addr("198.18.0.1:1"), None, 100, 1200, 1);
    let plan = q.plan(true, &[]);
    assert!(plan
        .iter()
        .all(|(count, segment)| count * segment <= 65_000));
    assert_eq!(plan.iter().map(|(count, _)| count).sum::<usize>(), 100);
}

#[test]
fn adjacent_arena_datagrams_share_one_iovec() {
    let arena = vec![7u8; 1000];
    let mut q = SendQueue::default();
    let to = addr("198.18.0.1:1");
    // Three adjacent 100-byte datagrams, then one elsewhere in the arena.
    for start in [0, 100, 200, 500] {
        q.push_arena(0, to, None, start, 100);
    }
    assert_eq!(q.plan(true, &arena), vec![(4, 100)]);
    assert_eq!(q.iovecs_of(0), 2);
}

/// Datagrams out of the arena (with a header written into their headroom) and owned buffers,
/// as GSO runs and one by one, arrive intact and in order.
#[test]
fn arena_and_owned_transmits_round_trip_with_and_without_gso() {
    let _switch = gso_switch();
    let receiver = super::bind_udp_std(addr("127.0.0.1:0"), false).expect("bind");
    let sender = super::bind_relay(addr("127.0.0.1:0")).expect("bind");
    let relay = super::bind_relay(addr("127.0.0.1:0")).expect("bind");
    let to = receiver.local_addr().expect("addr");
    let gso_works = probe_gso();
    for gso in [gso_works, false] {
        set_gso_for_test(gso);
        // Ten datagrams reach a relay socket (no GRO: one slot each, with headroom).
        let mut q = SendQueue::default();
        for i in 0..10u8 {
            q.push_owned(0, relay.local_addr().expect("addr"), None, vec![i; 200]);
        }
        assert_eq!(flush(&mut q, &sender), 0);
        let mut arena = Arena::new(16, 2048);
        let mut datagrams = Vec::new();
        while datagrams.len() < 10 {
            wait_readable(&relay);
            arena.recv(relay.as_raw_fd(), &mut datagrams).expect("recv");
        }
        assert!(datagrams.iter().all(|d| d.headroom));
        // Each goes on with a header in front, then one owned datagram behind them.
        for (i, d) in datagrams.iter().enumerate() {
            assert!(arena.prepend(d, [0x40, 0, 0, i as u8]));
            q.push_arena(0, to, None, d.start - HEADROOM, d.len + HEADROOM);
        }
        q.push_owned(0, to, None, vec![0xee; 50]);
        let fd = sender.as_raw_fd();
        assert_eq!(q.flush(arena.bytes(), |_| Some(fd)), 0, "gso={gso}");
        let mut rx = Arena::new(64, 65_535);
        let got = receive(&mut rx, &receiver, 11);
        for (i, (_, to, d)) in got.iter().take(10).enumerate() {
            // A socket bound to one address has no pktinfo to report.
            assert_eq!(*to, None);
            let mut expected = vec![0x40, 0, 0, i as u8];
            expected.extend(vec![i as u8; 200]);
            assert_eq!(d, &expected, "gso={gso}");
        }
        assert_eq!(got[10].2, vec![0xee; 50]);
    }
    set_gso_for_test(gso_works);
}

/// A datagram the kernel refuses (port 0: EINVAL) is dropped alone; it says nothing about
/// GSO, which stays on for the run behind it; a closed socket's transmits are dropped.
#[test]
fn a_refused_datagram_is_dropped_alone() {
    let _switch = gso_switch();
    if !probe_gso() {
        return;
    }
    let receiver = super::bind_udp_std(addr("127.0.0.1:0"), false).expect("bind");
    let sender = client("127.0.0.1:0");
    let to = receiver.local_addr().expect("addr");
    let mut q = SendQueue::default();
    queue_burst(&mut q, addr("127.0.0.1:0"), None, 1, 100, 1);
    queue_burst(&mut q, to, None, 3, 100, 2);
    queue_burst(&mut q, to, None, 2, 100, 3);
    let fd = sender.as_raw_fd();
    // Socket 1 is gone: its two datagrams are dropped too.
    let dropped = {
        let mut n = 0;
        let mut q2 = SendQueue::default();
        queue_burst(&mut q2, to, None, 2, 100, 9);
        n += q2.flush(&[], |_| None);
        n + q.flush(&[], |_| Some(fd))
    };
    assert_eq!(dropped, 3);
    assert!(super::batch::gso_enabled(), "GSO was turned off");
    let mut rx = Arena::new(64, 65_535);
    assert_eq!(receive(&mut rx, &receiver, 5).len(), 5);
}

/// Two clients contact a 0.0.0.0 listener through 127.0.0.2 and 127.0.0.3 (all of 127/8 is
/// local): each datagram reports the address it was sent to, and replies sent with that source
/// arrive from it, both as GSO runs and one by one.
#[test]
fn wildcard_ipv4_listener_reports_and_answers_from_the_contacted_address() {
    let _switch = gso_switch();
    let server = super::bind_udp_std(addr("0.0.0.0:0"), false).expect("bind 0.0.0.0");
    let port = server.local_addr().expect("addr").port();
    let (a, b) = (client("127.0.0.1:0"), client("127.0.0.1:0"));
    let (via_a, via_b) = (
        SocketAddr::new(ip("127.0.0.2"), port),
        SocketAddr::new(ip("127.0.0.3"), port),
    );
    let mut rx = Arena::new(64, 65_535);
    let gso_works = probe_gso();
    for gso in [gso_works, false] {
        set_gso_for_test(gso);
        let mut q = SendQueue::default();
        queue_burst(&mut q, via_a, None, 3, 120, 1);
        flush(&mut q, &a);
        queue_burst(&mut q, via_b, None, 3, 120, 2);
        flush(&mut q, &b);
        let got = receive(&mut rx, &server, 6);
        let (a_addr, b_addr) = (a.local_addr().expect("a"), b.local_addr().expect("b"));
        for (from, to, _) in &got {
            let expected = if *from == a_addr {
                ip("127.0.0.2")
            } else {
                assert_eq!(*from, b_addr);
                ip("127.0.0.3")
            };
            assert_eq!(*to, Some(expected), "gso={gso}");
        }
        // Answer each datagram from where it went (runs of three per client), then two more
        // to client a from the other address: a run must not cross sources.
        for (from, to, d) in &got {
            q.push_owned(0, *from, *to, d.clone());
        }
        queue_burst(&mut q, a_addr, Some(ip("127.0.0.3")), 2, 120, 3);
        assert_eq!(flush(&mut q, &server), 0, "gso={gso}");
        assert_eq!(
            sources(&a, 5),
            vec![via_a, via_a, via_a, via_b, via_b],
            "gso={gso}"
        );
        assert_eq!(sources(&b, 3), vec![via_b; 3], "gso={gso}");
    }
    set_gso_for_test(gso_works);
}

/// A GSO burst reaches a GRO-enabled wildcard listener as one aggregate: the receive carries
/// the UDP_GRO size and the pktinfo together, and the arena splits it (only the first datagram
/// of an aggregate has headroom).
#[test]
fn a_gro_aggregate_is_split_with_its_destination() {
    let _switch = gso_switch();
    if !probe_gso() {
        return;
    }
    set_gso_for_test(true);
    let server = super::bind_udp_std(addr("0.0.0.0:0"), false).expect("bind 0.0.0.0");
    let port = server.local_addr().expect("addr").port();
    let a = client("127.0.0.1:0");
    let mut q = SendQueue::default();
    queue_burst(
        &mut q,
        SocketAddr::new(ip("127.0.0.2"), port),
        None,
        4,
        100,
        5,
    );
    flush(&mut q, &a);
    wait_readable(&server);
    let mut arena = Arena::new(8, 65_535);
    let mut out = Vec::new();
    let n = arena.recv(server.as_raw_fd(), &mut out).expect("recv");
    assert_eq!(n, 1, "one GRO aggregate");
    assert_eq!(out.len(), 4);
    assert!(out
        .iter()
        .all(|d| d.len == 100 && d.to == Some(ip("127.0.0.2"))));
    let headroom: Vec<bool> = out.iter().map(|d| d.headroom).collect();
    assert_eq!(headroom, vec![true, false, false, false]);
}

/// The same over IPv6 on [::] (v6-only): ::1 is the only loopback address, so this checks that
/// it is reported and used as the source.
#[test]
fn wildcard_ipv6_listener_reports_and_answers_from_the_contacted_address() {
    let _switch = gso_switch();
    let server = super::bind_udp_std(addr("[::]:0"), false).expect("bind [::]");
    let port = server.local_addr().expect("addr").port();
    let client = client("[::1]:0");
    let client_addr = client.local_addr().expect("addr");
    let via = SocketAddr::new(ip("::1"), port);
    let mut rx = Arena::new(64, 65_535);
    let gso_works = probe_gso();
    for gso in [gso_works, false] {
        set_gso_for_test(gso);
        let mut q = SendQueue::default();
        queue_burst(&mut q, via, None, 3, 150, 1);
        flush(&mut q, &client);
        let got = receive(&mut rx, &server, 3);
        assert!(
            got.iter()
                .all(|(from, to, _)| *from == client_addr && *to == Some(ip("::1"))),
            "gso={gso}: {got:?}"
        );
        queue_burst(&mut q, client_addr, Some(ip("::1")), 3, 150, 2);
        assert_eq!(flush(&mut q, &server), 0, "gso={gso}");
        assert_eq!(sources(&client, 3), vec![via; 3], "gso={gso}");
    }
    set_gso_for_test(gso_works);
}

/// A flush with one datagram per socket (the many-allocations case) sends each with `sendto`,
/// or with `sendmsg` when it names its source: every datagram arrives whole, from the socket
/// it was queued on and the source it named, and a refused one is still dropped alone.
#[test]
fn single_datagrams_per_socket_arrive_from_their_socket_and_source() {
    let receiver = client("127.0.0.1:0");
    let to = receiver.local_addr().expect("addr");
    let senders: Vec<UdpSocket> = (0..3).map(|_| client("127.0.0.1:0")).collect();
    let wildcard = super::bind_udp_std(addr("0.0.0.0:0"), false).expect("bind 0.0.0.0");
    let mut q = SendQueue::default();
    for (token, len) in [(0u64, 120usize), (1, 1), (2, 1200)] {
        q.push_owned(token, to, None, vec![token as u8 + 1; len]);
    }
    q.push_owned(3, to, Some(ip("127.0.0.2")), vec![9; 50]);
    // Unreachable (port 0): refused by the kernel, dropped alone.
    q.push_owned(4, addr("127.0.0.1:0"), None, vec![0; 10]);
    let fds: Vec<_> = senders
        .iter()
        .map(AsRawFd::as_raw_fd)
        .chain([wildcard.as_raw_fd(), senders[0].as_raw_fd()])
        .collect();
    let dropped = q.flush(&[], |token| fds.get(token as usize).copied());
    assert_eq!(dropped, 1);
    let mut buf = vec![0u8; 2048];
    let mut got = Vec::new();
    for _ in 0..4 {
        wait_readable(&receiver);
        let (n, from) = receiver.recv_from(&mut buf).expect("recv_from");
        got.push((from, n, buf[0]));
    }
    got.sort_by_key(|g| g.2);
    let from = |s: &UdpSocket| s.local_addr().expect("addr");
    let wildcard_port = from(&wildcard).port();
    assert_eq!(
        got,
        vec![
            (from(&senders[0]), 120, 1),
            (from(&senders[1]), 1, 2),
            (from(&senders[2]), 1200, 3),
            (SocketAddr::new(ip("127.0.0.2"), wildcard_port), 50, 9),
        ]
    );
}
