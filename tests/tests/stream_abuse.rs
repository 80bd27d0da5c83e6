//! Malformed and abusive TCP/TLS streams against `relay serve` on loopback (issue 11): each gets
//! a clear outcome (an answer or a close), the relay keeps serving everyone else (a UDP Binding
//! and a full uclient run during and after), and nothing leaks (connections and allocations
//! back to zero in the metrics).
//!
//! Everything goes to 127.0.0.1; per-address caps are exercised from 127.0.0.3-5, which are the
//! test's own loopback source addresses.

mod support;

use std::{
    io::Write,
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    sync::Arc,
    time::{Duration, Instant},
};

use relay::proto::stun::{Attribute, Class, Message, MessageBuilder, Method, TransactionId};
use support::{
    client::Client,
    echo_peer, free_udp_port,
    stream::{raw_closed_within, tcp_connect, ReadEnd, StreamClient, StreamRelay},
    tls::TestPki,
    uclient_stream, Relay,
};

const PEER_IP: &str = "127.0.0.2";
const REALM: &str = "relay.local";
/// The largest message a stream may carry (STUN or ChannelData, header included).
const MAX_MESSAGE: usize = 16_384;
/// Long enough that a close within it is the relay's decision about the input, not a timeout.
const PROMPTLY: Duration = Duration::from_secs(3);

struct Streams {
    relay: Relay,
    tcp: SocketAddr,
    tls: SocketAddr,
    pki: TestPki,
}

fn relay_with(extra: &[&str]) -> Streams {
    let (pki, _) = TestPki::installed("relay-abuse");
    let args = [&["--legacy-channels"][..], extra].concat();
    let StreamRelay { relay, tcp, tls } = StreamRelay::start(&pki, &args);
    Streams {
        relay,
        tcp,
        tls,
        pki,
    }
}

impl Streams {
    fn tls_client(&self) -> StreamClient {
        StreamClient::tls(self.tls, REALM, self.pki.client_config(&[]))
    }

    /// A Binding over UDP is answered with the client's address.
    fn udp_binding_works(&self) {
        let mut client = Client::new(self.relay.listener(), REALM);
        let answer = client.request(Method::BINDING, &[]);
        let msg = Message::decode(&answer).expect("valid");
        assert_eq!(msg.class(), Class::Success);
        assert_eq!(
            msg.xor_mapped_address(),
            Some(client.socket.local_addr().expect("addr"))
        );
    }

    /// A fresh TCP and a fresh TLS connection each get a Binding answered.
    fn streams_work(&self) {
        let mut tcp = StreamClient::tcp(self.tcp, REALM);
        assert_eq!(tcp.binding(), Ok(tcp.local_addr()));
        let mut tls = self.tls_client();
        assert_eq!(tls.binding(), Ok(tls.local_addr()));
    }

    /// Waits until no TCP/TLS connection and no allocation is left.
    fn assert_nothing_left(&self) {
        for transport in ["tcp", "tls"] {
            let gauge = format!("relay_connections{{transport=\"{transport}\"}}");
            assert_eq!(
                self.relay.wait_metric(&gauge, 0, Duration::from_secs(10)),
                0,
                "{gauge}\n{}",
                self.relay.log()
            );
        }
        assert_eq!(
            self.relay
                .wait_metric("relay_allocations", 0, Duration::from_secs(5)),
            0
        );
        assert_eq!(self.relay.metric("relay_stream_buffered_bytes"), 0);
    }

    fn closed(&self, transport: &str) -> u64 {
        self.relay.metric_sum(
            "relay_connections_closed_total",
            &[&format!("transport=\"{transport}\"")],
        )
    }
}

/// A Binding request of exactly `total` bytes (an ignorable attribute pads it out).
fn binding_of_size(total: usize, tid: u8) -> Vec<u8> {
    let mut b = MessageBuilder::new(Class::Request, Method::BINDING, TransactionId([tid; 12]));
    // 20 header + 4 attribute header + value; comprehension-optional, so it is ignored.
    b.add_raw(0x8fff, &vec![0x61; total - 24]);
    let bytes = b.finish(None, false);
    assert_eq!(bytes.len(), total);
    bytes
}

/// uclient over TCP against the echo peer, 4 sessions x 100 messages: zero loss.
fn uclient_over_tcp(s: &Streams, peer_port: u16) {
    let port = s.tcp.port().to_string();
    let peer_port = peer_port.to_string();
    let (report, _) = uclient_stream(
        &[],
        &[
            "-t",
            "-u",
            "alice",
            "-w",
            "wonderland",
            "-e",
            PEER_IP,
            "-r",
            &peer_port,
            "-n",
            "100",
            "-m",
            "4",
            "-l",
            "200",
            "-z",
            "5",
            "-c",
            "-p",
            &port,
            "127.0.0.1",
        ],
    );
    assert_eq!(report.lost, Some(0), "{}\n{}", report.output, s.relay.log());
    assert_eq!(
        (report.sent, report.received),
        (400, 400),
        "{}",
        report.output
    );
}

/// Oversized lengths and garbage close the connection at once (and nothing is answered);
/// a message of exactly the maximum size, one split across 1-byte writes (over 100), and three
/// in one write are all answered. Meanwhile and afterwards UDP, TCP and TLS clients are served
/// and a uclient run over TCP loses nothing; no connection is left.
#[test]
fn malformed_streams_are_closed_or_answered_and_the_relay_keeps_serving() {
    let s = relay_with(&[]);
    let peer_port = free_udp_port(PEER_IP);
    let _peer = echo_peer(&[], PEER_IP, peer_port);

    // What must close the connection, sent over TCP and (after a good handshake) over TLS.
    let mut too_long_stun = binding_of_size(40, 1);
    let long = u16::try_from(MAX_MESSAGE - 20 + 4).expect("fits");
    too_long_stun[2..4].copy_from_slice(&long.to_be_bytes());
    let mut too_long_channel = vec![0x40, 0x00];
    let long = u16::try_from(MAX_MESSAGE - 4 + 4).expect("fits");
    too_long_channel.extend_from_slice(&long.to_be_bytes());
    too_long_channel.extend_from_slice(&[0u8; 64]);
    let cases: [(&str, Vec<u8>); 5] = [
        ("STUN length beyond 16384", too_long_stun),
        ("ChannelData length beyond 16384", too_long_channel),
        ("garbage 0b10", vec![0x80; 64]),
        ("garbage 0b11", vec![0xc3; 64]),
        // 'GE' reads as channel 0x4745 with length 0x5420: beyond the maximum.
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n".to_vec(),
        ),
    ];
    let closed_before = (s.closed("tcp"), s.closed("tls"));
    for (what, bytes) in &cases {
        for transport in ["tcp", "tls"] {
            let mut client = match transport {
                "tcp" => StreamClient::tcp(s.tcp, REALM),
                _ => s.tls_client(),
            };
            // The connection works before the bad input.
            assert_eq!(client.binding(), Ok(client.local_addr()), "{what}");
            // The write itself may already fail if the relay closed early: that is a close.
            let _ = client.send_raw(bytes);
            match client.closed_within(PROMPTLY) {
                Some((how, after)) => {
                    println!("{what} over {transport}: closed ({how}) after {after:?}")
                }
                None => panic!(
                    "{what} over {transport}: still open after {PROMPTLY:?}\n{}",
                    s.relay.log()
                ),
            }
            s.udp_binding_works();
        }
    }
    let closed_after = (s.closed("tcp"), s.closed("tls"));
    assert!(
        closed_after.0 >= closed_before.0 + 5 && closed_after.1 >= closed_before.1 + 5,
        "closes counted: {closed_before:?} -> {closed_after:?}"
    );

    // Exactly the maximum: answered; the connection stays usable.
    for transport in ["tcp", "tls"] {
        let mut client = match transport {
            "tcp" => StreamClient::tcp(s.tcp, REALM),
            _ => s.tls_client(),
        };
        client
            .send_raw(&binding_of_size(MAX_MESSAGE, 2))
            .expect("write");
        let answer = client.answer(TransactionId([2; 12]));
        let answer = answer
            .unwrap_or_else(|end| panic!("a {MAX_MESSAGE}-byte Binding over {transport}: {end:?}"));
        assert_eq!(
            Message::decode(&answer).map(|m| m.class()),
            Ok(Class::Success)
        );
        assert_eq!(client.binding(), Ok(client.local_addr()));
    }

    // One message in a hundred 1-byte writes (TCP: 100 segments; TLS: 100 records), then a
    // full Allocate flow split the same way.
    for transport in ["tcp", "tls"] {
        let mut client = match transport {
            "tcp" => StreamClient::tcp(s.tcp, REALM),
            _ => s.tls_client(),
        };
        let mut b = MessageBuilder::new(Class::Request, Method::BINDING, TransactionId([3; 12]));
        b.add(&Attribute::Software(
            "split into a hundred writes of one byte each, so every read holds one byte",
        ));
        let bytes = b.finish(None, true);
        assert!(bytes.len() >= 100, "{}", bytes.len());
        for byte in &bytes {
            client.send_raw(std::slice::from_ref(byte)).expect("write");
            std::thread::sleep(Duration::from_millis(1));
        }
        let answer = client
            .answer(TransactionId([3; 12]))
            .unwrap_or_else(|end| panic!("split Binding over {transport}: {end:?}"));
        let msg = Message::decode(&answer).expect("valid");
        assert_eq!(msg.xor_mapped_address(), Some(client.local_addr()));

        // Three requests in one write: three answers, in order.
        let mut bytes = Vec::new();
        let mut tids = Vec::new();
        for _ in 0..3 {
            let (tid, request) = client.encode_request(Method::BINDING, &[]);
            bytes.extend(request);
            tids.push(tid);
        }
        client.send_raw(&bytes).expect("write");
        for tid in tids {
            let frame = client.next_frame().expect("an answer");
            assert_eq!(Message::decode(&frame).map(|m| m.transaction_id()), Ok(tid));
        }
    }
    s.streams_work();
    s.udp_binding_works();
    uclient_over_tcp(&s, peer_port);
    s.assert_nothing_left();
}

/// With `--stream-handshake-timeout 2` and `--stream-idle-timeout 2`: half a STUN message then
/// silence, a silent TCP connection, half a TLS ClientHello, a silent TLS connection, and a
/// finished TLS handshake without any STUN are each closed after the deadline (not before
/// a second has passed, and within a few seconds). A connection that sent a Binding and holds
/// no allocation is closed once idle; one holding an allocation is not. uclient over TCP loses
/// nothing meanwhile.
#[test]
fn stalled_streams_are_closed_after_the_deadlines_and_others_are_served_meanwhile() {
    let s = relay_with(&[
        "--stream-handshake-timeout",
        "2",
        "--stream-idle-timeout",
        "2",
    ]);
    let peer_port = free_udp_port(PEER_IP);
    let _peer = echo_peer(&[], PEER_IP, peer_port);

    let half_binding = {
        let mut b = MessageBuilder::new(Class::Request, Method::BINDING, TransactionId([4; 12]));
        b.add(&Attribute::Software("half of me never comes"));
        let bytes = b.finish(None, true);
        bytes[..bytes.len() / 2].to_vec()
    };
    let half_client_hello = {
        let mut conn = rustls::ClientConnection::new(
            s.pki.client_config(&[]),
            support::tls::server_name(s.tls.ip()),
        )
        .expect("client");
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).expect("ClientHello");
        hello.truncate(hello.len() / 2);
        hello
    };
    let opened = Instant::now();
    let mut stalled: Vec<(&str, TcpStream)> = Vec::new();
    for (what, server, bytes) in [
        ("half a STUN message", s.tcp, half_binding.as_slice()),
        ("a silent TCP connection", s.tcp, &[][..]),
        ("half a ClientHello", s.tls, half_client_hello.as_slice()),
        ("a silent TLS connection", s.tls, &[][..]),
    ] {
        let mut stream = tcp_connect(None, server).expect("connect");
        stream.write_all(bytes).expect("write");
        stalled.push((what, stream));
    }
    // A TLS client that finishes the handshake and then says nothing.
    let mut handshaken = s.tls_client();
    // A TCP client that sent one Binding, and one holding an allocation.
    let mut bound = StreamClient::tcp(s.tcp, REALM);
    assert_eq!(bound.binding(), Ok(bound.local_addr()));
    let mut allocated = StreamClient::tcp(s.tcp, REALM);
    allocated.login("alice", "wonderland");
    allocated.allocate();

    // While they stall: UDP, TCP and TLS clients are served, and uclient loses nothing.
    s.udp_binding_works();
    s.streams_work();
    uclient_over_tcp(&s, peer_port);

    let deadline = Duration::from_secs(2 + 5);
    for (what, mut stream) in stalled {
        let closed = raw_closed_within(&mut stream, deadline.saturating_sub(opened.elapsed()));
        let at = opened.elapsed();
        assert!(closed.is_some(), "{what}: still open after {at:?}");
        assert!(
            at >= Duration::from_secs(1),
            "{what}: closed already at {at:?}"
        );
        println!("{what}: closed ({:?}) at {at:?}", closed.map(|c| c.0));
    }
    let closed = handshaken.closed_within(deadline.saturating_sub(opened.elapsed()));
    assert!(
        closed.is_some(),
        "a TLS connection without STUN: still open after {:?}",
        opened.elapsed()
    );
    let closed = bound.closed_within(deadline.saturating_sub(opened.elapsed()));
    assert!(
        closed.is_some(),
        "an idle connection without allocation: still open after {:?}",
        opened.elapsed()
    );
    // The allocated connection outlived both deadlines and still works.
    assert_eq!(allocated.refresh(600), (Class::Success, None));
    assert_eq!(s.relay.metric("relay_connections{transport=\"tcp\"}"), 1);
    drop(allocated);
    s.udp_binding_works();
    s.assert_nothing_left();
    let closed = s.closed("tcp") + s.closed("tls");
    assert!(closed >= 7, "only {closed} closes counted");
}

/// Raises this process's open-file limit to its hard limit (the thousand connections below).
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one `rlimit` we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    assert!(
        limit.rlim_cur >= 1200,
        "open-file hard limit {}",
        limit.rlim_cur
    );
}

/// 1000 idle connections from one address (600 silent TCP, 300 TCP after one Binding, 100
/// finished TLS handshakes) are all held, a uclient run over TCP and a UDP Binding succeed
/// meanwhile, and the deadlines close every one of them: the gauges return to zero and each
/// client sees its connection end.
#[test]
fn a_thousand_idle_connections_are_closed_by_the_deadlines_while_others_are_served() {
    raise_nofile();
    let s = relay_with(&[
        "--max-connections-per-ip",
        "2000",
        "--stream-handshake-timeout",
        "6",
        "--stream-idle-timeout",
        "6",
    ]);
    let peer_port = free_udp_port(PEER_IP);
    let _peer = echo_peer(&[], PEER_IP, peer_port);
    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..600 {
        silent.push(tcp_connect(None, s.tcp).expect("connect"));
    }
    let mut bound = Vec::new();
    for _ in 0..300 {
        let mut client = StreamClient::tcp(s.tcp, REALM);
        assert_eq!(client.binding(), Ok(client.local_addr()));
        bound.push(client);
    }
    let config = s.pki.client_config(&[]);
    let mut tls = Vec::new();
    for _ in 0..100 {
        tls.push(StreamClient::tls(s.tls, REALM, Arc::clone(&config)));
    }
    let took = opened.elapsed();
    println!("1000 connections opened in {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "opening took {took:?}: the deadlines may have closed some already"
    );
    assert_eq!(s.relay.metric("relay_connections{transport=\"tcp\"}"), 900);
    assert_eq!(s.relay.metric("relay_connections{transport=\"tls\"}"), 100);

    s.udp_binding_works();
    s.streams_work();
    uclient_over_tcp(&s, peer_port);

    // Every one of them is closed by its deadline.
    s.assert_nothing_left();
    for mut stream in silent {
        stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_read_timeout(Some(Duration::from_millis(200))))
            .expect("socket options");
        assert!(
            raw_closed_within(&mut stream, Duration::from_secs(2)).is_some(),
            "a silent connection was not closed"
        );
    }
    for mut client in bound.into_iter().chain(tls) {
        assert!(
            client.closed_within(Duration::from_secs(2)).is_some(),
            "an idle connection to {} was not closed",
            client.server
        );
    }
    s.udp_binding_works();
    s.streams_work();
}

/// `--max-connections-per-ip 3` and `--max-connections 5`: the fourth connection from one
/// address and the sixth relay-wide are closed at once (never answered), each refusal counted
/// by reason; a closed connection frees its slot.
#[test]
fn connection_caps_close_new_connections_at_once() {
    let s = relay_with(&["--max-connections-per-ip", "3", "--max-connections", "5"]);
    let from = |ip: &str| -> IpAddr { ip.parse().expect("ip") };
    let served = |ip: &str| {
        let mut client = StreamClient::tcp_from(Some(from(ip)), s.tcp, REALM);
        assert_eq!(client.binding(), Ok(client.local_addr()), "from {ip}");
        client
    };
    let refused = |ip: &str| {
        let mut client = StreamClient::tcp_from(Some(from(ip)), s.tcp, REALM);
        let (tid, request) = client.encode_request(Method::BINDING, &[]);
        let _ = client.send_raw(&request);
        match client.answer(tid) {
            Err(ReadEnd::Closed(how)) => println!("over the cap from {ip}: closed ({how})"),
            other => panic!("over the cap from {ip}: {other:?}\n{}", s.relay.log()),
        }
    };
    let mut held: Vec<StreamClient> = (0..3).map(|_| served("127.0.0.3")).collect();
    refused("127.0.0.3");
    assert_eq!(
        s.relay
            .metric("relay_connections_refused_total{reason=\"per_ip\"}"),
        1
    );
    held.push(served("127.0.0.4"));
    held.push(served("127.0.0.4"));
    refused("127.0.0.5");
    assert_eq!(
        s.relay
            .metric("relay_connections_refused_total{reason=\"total\"}"),
        1
    );
    assert_eq!(s.relay.metric("relay_connections{transport=\"tcp\"}"), 5);
    // UDP is not capped by stream limits.
    s.udp_binding_works();
    // A closed connection frees its slot, per address and relay-wide.
    drop(held.remove(0));
    assert_eq!(
        s.relay.wait_metric(
            "relay_connections{transport=\"tcp\"}",
            4,
            Duration::from_secs(5)
        ),
        4
    );
    held.push(served("127.0.0.3"));
    drop(held);
    s.assert_nothing_left();
    s.streams_work();
}

/// Twenty TCP and twenty TLS allocations end when their connections close, however they close
/// (FIN, RST, TLS close_notify): allocations and connections back to zero, relayed ports free.
#[test]
fn closing_connections_deletes_their_allocations() {
    let s = relay_with(&[]);
    let mut clients = Vec::new();
    for i in 0..40 {
        let mut client = if i % 2 == 0 {
            StreamClient::tcp(s.tcp, REALM)
        } else {
            s.tls_client()
        };
        client.login("alice", "wonderland");
        let relayed = client.allocate();
        clients.push((client, relayed));
    }
    assert_eq!(s.relay.metric("relay_allocations"), 40);
    for transport in ["tcp", "tls"] {
        assert_eq!(
            s.relay.metric(&format!(
                "relay_allocations_by_transport{{transport=\"{transport}\"}}"
            )),
            20
        );
    }
    let mut relayed_ports = Vec::new();
    for (i, (client, relayed)) in clients.into_iter().enumerate() {
        relayed_ports.push(relayed);
        match (i % 4, client.conn) {
            // RST: SO_LINGER 0.
            (0, support::stream::Conn::Tcp(stream)) => {
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .expect("linger");
            }
            // TLS close_notify, then FIN.
            (1, support::stream::Conn::Tls(mut stream)) => {
                stream.conn.send_close_notify();
                let _ = stream.flush();
            }
            // Plain FIN (drop).
            _ => {}
        }
    }
    s.assert_nothing_left();
    for relayed in relayed_ports {
        UdpSocket::bind(relayed)
            .unwrap_or_else(|e| panic!("{relayed} still held after its connection closed: {e}"));
    }
    assert!(s.closed("tcp") >= 20 && s.closed("tls") >= 20);
    s.udp_binding_works();
    s.streams_work();
}

/// A stream client that never reads while the peer floods it loses datagrams (UDP semantics)
/// and is eventually closed, the send drops counted; another client on the same relay is
/// served throughout and the relay's buffered bytes return to zero.
#[test]
fn a_client_that_does_not_read_loses_datagrams_and_does_not_hurt_others() {
    let s = relay_with(&[]);
    let peer = UdpSocket::bind((PEER_IP, 0)).expect("peer socket");
    let peer_addr = peer.local_addr().expect("addr");
    let mut lazy = StreamClient::tcp(s.tcp, REALM);
    // A small receive buffer on the lazy client, so the relay's queue fills quickly.
    socket2::SockRef::from(lazy.conn.tcp())
        .set_recv_buffer_size(4096)
        .expect("SO_RCVBUF");
    lazy.login("alice", "wonderland");
    let relayed = lazy.allocate();
    lazy.permit(peer_addr);
    // 20 MB at the lazy client, paced a little so loopback UDP does not drop it first.
    let payload = vec![0x55u8; 1000];
    for i in 0..20_000 {
        peer.send_to(&payload, relayed).expect("peer sends");
        if i % 200 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let drops = s.relay.metric("relay_stream_send_drops_total");
    println!("send drops for the client that does not read: {drops}");
    assert!(drops > 0, "nothing dropped for a client that never reads");
    // Others are served meanwhile.
    s.udp_binding_works();
    s.streams_work();
    let mut other = s.tls_client();
    other.login("alice", "wonderland");
    other.allocate();
    drop(other);
    // What the relay holds for it stays bounded, and it is closed eventually (without ever
    // reading: the relay decides), its allocation with it.
    let buffered = s.relay.metric("relay_stream_buffered_bytes");
    assert!(
        buffered < 8 << 20,
        "{buffered} bytes buffered for one client"
    );
    assert_eq!(
        s.relay.wait_metric(
            "relay_connections{transport=\"tcp\"}",
            0,
            Duration::from_secs(20)
        ),
        0,
        "a client that never reads is never closed\n{}",
        s.relay.log()
    );
    s.assert_nothing_left();
    drop(lazy);
}
