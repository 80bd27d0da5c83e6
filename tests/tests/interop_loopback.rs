//! `relay serve` on loopback against real third-party TURN clients (coturn's
//! `turnutils_uclient`, aioice) and against malformed input.
//!
//! Peers live on 127.0.0.2, which the relay allows with `--allow-peer-unsafe 127.0.0.2` (no
//! `--allow-peer` CIDR opens loopback, and the relay's own 127.0.0.1 is always denied).

mod support;

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use relay::proto::stun::{
    attr_type, Attribute, Class, Message, MessageBuilder, Method, TransactionId,
};
use support::{
    client::{error_code, Client},
    echo_peer, free_udp_port, run_aioice, uclient, Relay,
};

const PEER_IP: &str = "127.0.0.2";
const REALM: &str = "relay.local";

fn relay_with(extra: &[&str]) -> Relay {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--realm",
        REALM,
        "--allow-peer-unsafe",
        "127.0.0.2",
        "--log-level",
        "info",
    ];
    args.extend_from_slice(extra);
    Relay::start(&args)
}

#[test]
fn aioice_allocate_permission_send_data_channels_refresh_and_401() {
    let relay = relay_with(&["--user", "alice:wonderland"]);
    run_aioice(&[], relay.listener(), "alice", "wonderland", PEER_IP);
}

#[test]
fn uclient_channel_data_with_long_term_credentials_loses_nothing() {
    let relay = relay_with(&["--user", "alice:wonderland", "--legacy-channels"]);
    let peer_port = free_udp_port(PEER_IP);
    let _peer = echo_peer(&[], PEER_IP, peer_port);
    let port = relay.listener().port().to_string();
    let peer_port = peer_port.to_string();
    let report = uclient(
        &[],
        &[
            "-u",
            "alice",
            "-w",
            "wonderland",
            "-e",
            PEER_IP,
            "-r",
            &peer_port,
            "-n",
            "200",
            "-m",
            "4",
            "-l",
            "200",
            "-c",
            "-p",
            &port,
            "127.0.0.1",
        ],
    );
    assert_eq!(report.lost, Some(0), "{}\n{}", report.output, relay.log());
    assert_eq!(
        (report.sent, report.received),
        (800, 800),
        "{}",
        report.output
    );
}

/// Issue 13, capacity per host: two relay IPs of one family (`--relay-ip` twice); uclient's
/// allocations take them in turn and relay over both with nothing lost.
#[test]
fn allocations_spread_over_several_relay_ips_of_a_family() {
    let relay = relay_with(&[
        "--user",
        "alice:wonderland",
        "--legacy-channels",
        "--relay-ip",
        "127.0.0.3",
        "--workers",
        "1",
    ]);
    let peer_port = free_udp_port(PEER_IP);
    let _peer = echo_peer(&[], PEER_IP, peer_port);
    let port = relay.listener().port().to_string();
    let peer_port = peer_port.to_string();
    let report = uclient(
        &[],
        &[
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
            "-c",
            "-p",
            &port,
            "127.0.0.1",
        ],
    );
    assert_eq!(report.lost, Some(0), "{}\n{}", report.output, relay.log());
    assert_eq!(
        (report.sent, report.received),
        (400, 400),
        "{}",
        report.output
    );
    // Four more allocations, held: the least used relay IP takes each, so they split 2/2
    // whatever uclient left behind (it deletes half of the allocations it makes).
    let before = relay.allocations().allocations.len();
    let mut clients = Vec::new();
    let mut ips = Vec::new();
    for _ in 0..4 {
        let mut client = support::client::Client::new(relay.listener(), REALM);
        client.login("alice", "wonderland");
        ips.push(client.allocate().ip().to_string());
        clients.push(client);
    }
    let list = relay.allocations();
    assert_eq!(list.allocations.len(), before + 4);
    let on = |ip: &str| {
        list.allocations
            .iter()
            .filter(|a| a.relayed.starts_with(&format!("{ip}:")))
            .count()
    };
    let (first, second) = (on("127.0.0.1"), on("127.0.0.3"));
    assert!(
        first.abs_diff(second) <= 1 && second > 0,
        "spread over both IPs: {first} and {second}; new ones on {ips:?}"
    );
    for mut client in clients {
        client.delete();
    }
}

#[test]
fn uclient_send_indications_with_rest_credentials_loses_nothing() {
    // Two secrets: the client signs with the second, as during a rotation.
    let relay = relay_with(&["--auth-secret", "old-secret", "--auth-secret", "new-secret"]);
    let peer_port = free_udp_port(PEER_IP);
    let _peer = echo_peer(&[], PEER_IP, peer_port);
    let port = relay.listener().port().to_string();
    let peer_port = peer_port.to_string();
    let report = uclient(
        &[],
        &[
            "-u",
            "bob",
            "-W",
            "new-secret",
            "-s",
            "-e",
            PEER_IP,
            "-r",
            &peer_port,
            "-n",
            "100",
            "-m",
            "2",
            "-l",
            "120",
            "-c",
            "-p",
            &port,
            "127.0.0.1",
        ],
    );
    assert_eq!(report.lost, Some(0), "{}\n{}", report.output, relay.log());
    assert_eq!(
        (report.sent, report.received),
        (200, 200),
        "{}",
        report.output
    );

    let wrong = uclient(
        &[],
        &[
            "-u",
            "bob",
            "-W",
            "not-the-secret",
            "-e",
            PEER_IP,
            "-r",
            &peer_port,
            "-n",
            "5",
            "-m",
            "1",
            "-c",
            "-p",
            &port,
            "127.0.0.1",
        ],
    );
    assert_eq!(wrong.received, 0, "{}", wrong.output);
    assert!(
        wrong.output.contains("Cannot complete Allocation"),
        "{}",
        wrong.output
    );
}

#[test]
fn malformed_input_gets_the_right_answer_and_the_server_keeps_serving() {
    let relay = relay_with(&["--user", "alice:wonderland"]);
    let server = relay.listener();
    let mut client = Client::new(server, REALM);

    // Not STUN, truncated, lengths that disagree with the datagram, wrong cookie, oversized:
    // dropped without an answer.
    let mut wrong_length =
        MessageBuilder::new(Class::Request, Method::BINDING, TransactionId([1; 12]))
            .finish(None, false);
    wrong_length[3] = 40;
    let mut wrong_cookie =
        MessageBuilder::new(Class::Request, Method::BINDING, TransactionId([2; 12]))
            .finish(None, false);
    wrong_cookie[4] ^= 0xff;
    let oversized = vec![0u8; 65_000];
    for junk in [
        &[][..],
        &[0x00][..],
        &[0u8; 19][..],
        &wrong_length[..],
        &wrong_cookie[..],
        &oversized[..],
        &[0xff; 64][..],
    ] {
        client.send_raw(junk);
    }
    assert_eq!(client.recv(), None, "junk must not be answered");

    // A request whose attribute runs past the end: 400 (RFC 8489 §6.3.1).
    let mut truncated_attr =
        MessageBuilder::new(Class::Request, Method::BINDING, TransactionId([3; 12]));
    truncated_attr.add(&Attribute::Software("x"));
    let mut truncated_attr = truncated_attr.finish(None, false);
    truncated_attr[22..24].copy_from_slice(&200u16.to_be_bytes());
    client.send_raw(&truncated_attr);
    assert_eq!(client.recv().as_deref().and_then(error_code), Some(400));

    // Unknown comprehension-required attribute: 420 with UNKNOWN-ATTRIBUTES.
    let mut unknown = MessageBuilder::new(Class::Request, Method::BINDING, TransactionId([4; 12]));
    unknown.add_raw(0x0777, b"abcd");
    client.send_raw(&unknown.finish(None, false));
    let answer = client.recv().expect("420");
    let msg = Message::decode(&answer).expect("valid");
    assert_eq!(msg.error_code(), Some(420));
    assert!(msg
        .attributes()
        .iter()
        .any(|a| matches!(a, Attribute::UnknownAttributes(list) if list == &[0x0777])));

    // Bad integrity: 401, nothing allocated.
    client.login("alice", "not-the-password");
    let response = client.request(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    assert_eq!(error_code(&response), Some(401));

    // Right credentials: allocation; unsupported transport 442 first.
    client.login("alice", "wonderland");
    let response = client.request(Method::ALLOCATE, &[Attribute::RequestedTransport(6)]);
    assert_eq!(error_code(&response), Some(442));
    let response = client.request(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    let msg = Message::decode(&response).expect("valid");
    assert_eq!(msg.class(), Class::Success, "{msg:?}");
    assert!(msg.xor_relayed_address().is_some());

    // Forbidden peers (RFC 8656 §9 policy): metadata, private ranges, loopback other than
    // the relay's own address.
    for peer in ["127.0.0.3:9", "169.254.169.254:80", "10.0.0.1:9", "[::1]:9"] {
        let peer: SocketAddr = peer.parse().expect("addr");
        let response = client.request(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(peer)],
        );
        let code = error_code(&response);
        assert!(
            code == Some(403) || code == Some(443),
            "{peer}: expected 403/443, got {code:?}"
        );
    }
    // The relay's own address is a peer only at live relayed ports (client-to-client): a
    // channel to any other port of it is 403.
    let response = client.request(
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress("127.0.0.1:9".parse().expect("addr")),
        ],
    );
    assert_eq!(error_code(&response), Some(403));
    // A channel number outside 0x4000-0x4FFF: 400.
    let peer: SocketAddr = format!("{PEER_IP}:9").parse().expect("addr");
    let response = client.request(
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x5000),
            Attribute::XorPeerAddress(peer),
        ],
    );
    assert_eq!(error_code(&response), Some(400));

    // ChannelData on a channel that is not bound, and with a wrong length: dropped.
    client.send_raw(&[0x40, 0x01, 0x00, 0x04, 1, 2, 3, 4]);
    client.send_raw(&[0x40, 0x01, 0x00, 0x40, 1, 2, 3, 4]);
    assert_eq!(client.recv(), None);

    // Delete, then requests on the deleted allocation get 437 (RFC 8656 §8, §10).
    let response = client.request(Method::REFRESH, &[Attribute::Lifetime(0)]);
    let msg = Message::decode(&response).expect("valid");
    assert_eq!(msg.class(), Class::Success);
    assert_eq!(msg.lifetime(), Some(0));
    let response = client.request(
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer)],
    );
    assert_eq!(error_code(&response), Some(437));

    // After all of that the server still serves everyone: a plain Binding and a full client.
    let mut fresh = Client::new(server, REALM);
    let response = fresh.request(Method::BINDING, &[]);
    let msg = Message::decode(&response).expect("valid");
    assert_eq!(msg.class(), Class::Success);
    assert_eq!(
        msg.xor_mapped_address(),
        Some(fresh.socket.local_addr().expect("addr"))
    );
    assert!(msg.has(attr_type::FINGERPRINT));
    run_aioice(&[], server, "alice", "wonderland", PEER_IP);
}

#[test]
fn shutdown_releases_the_relay_sockets() {
    let relay = relay_with(&["--user", "alice:wonderland"]);
    let mut client = Client::new(relay.listener(), REALM);
    client.login("alice", "wonderland");
    let response = client.request(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    let relayed = Message::decode(&response)
        .ok()
        .and_then(|m| m.xor_relayed_address())
        .expect("allocated");
    // The relayed port is taken while the relay runs and free once it stopped.
    assert!(
        UdpSocket::bind(relayed).is_err(),
        "{relayed} should be in use"
    );
    let log = relay.stop();
    assert!(log.contains("relay sockets released"), "{log}");
    assert!(log.contains("relay stopped"), "{log}");
    UdpSocket::bind(relayed).unwrap_or_else(|e| panic!("{relayed} still in use: {e}"));
}

#[test]
fn ctl_lists_allocations_counts_socket_traffic_and_serves_metrics() {
    let relay = relay_with(&["--user", "alice:wonderland"]);
    let peer = UdpSocket::bind((PEER_IP, 0)).expect("peer socket");
    peer.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let peer_addr = peer.local_addr().expect("peer addr");
    let mut client = Client::new(relay.listener(), REALM);
    client.login("alice", "wonderland");
    let response = client.request(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    let relayed = Message::decode(&response)
        .ok()
        .and_then(|m| m.xor_relayed_address())
        .expect("allocated");
    let response = client.request(
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer_addr)],
    );
    assert_eq!(
        Message::decode(&response).map(|m| m.class()),
        Ok(Class::Success)
    );
    // Three Send indications of 10 bytes reach the peer; one 7-byte datagram comes back.
    for _ in 0..3 {
        let mut send = MessageBuilder::new(Class::Indication, Method::SEND, TransactionId([9; 12]));
        send.add(&Attribute::XorPeerAddress(peer_addr))
            .add(&Attribute::Data(b"0123456789"));
        client.send_raw(&send.finish(None, false));
        let mut buf = [0u8; 64];
        let (n, from) = peer.recv_from(&mut buf).expect("relayed to peer");
        assert_eq!((&buf[..n], from), (&b"0123456789"[..], relayed));
    }
    peer.send_to(b"reply!!", relayed).expect("peer sends");
    let data = client.recv().expect("Data indication");
    let msg = Message::decode(&data).expect("valid");
    assert_eq!(
        (msg.class(), msg.method()),
        (Class::Indication, Method::DATA)
    );

    let (ok, stdout, stderr) = relay.ctl(&["allocations", "--json"]);
    assert!(ok, "{stderr}");
    let list: relay::control::AllocationList = serde_json::from_str(&stdout).expect("json");
    assert!(!list.fastpath_attached);
    assert_eq!(list.allocations.len(), 1, "{stdout}");
    let a = &list.allocations[0];
    assert_eq!(a.user, "alice");
    assert_eq!(a.relayed, relayed.to_string());
    assert_eq!(a.peers, vec![PEER_IP.to_owned()]);
    assert_eq!(a.path, "socket");
    assert_eq!((a.socket.to_peer_packets, a.socket.to_peer_bytes), (3, 30));
    assert_eq!(a.socket.to_client_packets, 1);
    assert_eq!(a.kernel.packets(), 0);

    let (ok, table, stderr) = relay.ctl(&["allocations"]);
    assert!(ok, "{stderr}");
    assert!(
        table.contains("RELAYED") && table.contains(&relayed.to_string()),
        "{table}"
    );

    // Without a fast path, the toggle explains why it cannot apply.
    let (ok, _, stderr) = relay.ctl(&["fastpath", "on", &a.id.to_string()]);
    assert!(!ok);
    assert!(stderr.contains("--fastpath off"), "{stderr}");
    let (ok, _, stderr) = relay.ctl(&["fastpath", "sideways", "1"]);
    assert!(!ok);
    assert!(stderr.contains("expected `on` or `off`"), "{stderr}");

    // A browser cannot drive it: foreign Host names (DNS rebinding) and POSTs without the
    // ctl header are refused.
    let foreign = raw_http(
        relay.admin,
        "GET /allocations HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    );
    assert!(foreign.starts_with("HTTP/1.1 403"), "{foreign}");
    let csrf = raw_http(
        relay.admin,
        &format!(
            "POST /fastpath/default/off HTTP/1.1\r\nHost: {}\r\n\r\n",
            relay.admin
        ),
    );
    assert!(csrf.starts_with("HTTP/1.1 403"), "{csrf}");

    let metrics = relay_tests_http_get(relay.admin, "/metrics");
    assert!(metrics.contains("relay_allocations 1"), "{metrics}");
    assert!(
        metrics.contains("relay_relayed_packets_total{path=\"socket\",direction=\"to_peer\"} 3"),
        "{metrics}"
    );
}

/// A plain HTTP GET against the admin endpoint, as Prometheus would do it.
fn relay_tests_http_get(admin: SocketAddr, path: &str) -> String {
    let text = raw_http(
        admin,
        &format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\n\r\n"),
    );
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// Sends `request` as is to the admin endpoint and returns the whole answer.
fn raw_http(admin: SocketAddr, request: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(admin).expect("connect admin");
    stream.write_all(request.as_bytes()).expect("write");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    text
}

/// One HTTP/1.1 GET or POST; returns the status code and the body.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `--metrics`: a read-only listener with `/metrics`, `/healthz` and `/readyz` (for Prometheus
/// and Kubernetes probes), nothing else; the probes answer on the admin endpoint too.
#[test]
fn the_metrics_listener_serves_metrics_and_health_only() {
    let relay = relay_with(&["--metrics", "127.0.0.1:0"]);
    let log = relay.log();
    let metrics: SocketAddr = log
        .split("metrics endpoint on http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics endpoint in\n{log}"));
    for endpoint in [metrics, relay.admin] {
        for probe in ["/healthz", "/readyz"] {
            let (status, body) = http(endpoint, "GET", probe);
            assert_eq!(status, 200, "{probe} on {endpoint}: {body}");
            assert!(body.contains("\"live\": true"), "{body}");
        }
    }
    let (status, body) = http(metrics, "GET", "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("relay_allocations "), "{body}");
    // Nothing that lists users or changes state.
    assert_eq!(http(metrics, "GET", "/allocations").0, 404);
    assert_eq!(http(metrics, "POST", "/fastpath/default/off").0, 404);
    assert_eq!(http(metrics, "POST", "/metrics").0, 405);
}

/// Issue 12 item 8: started with a soft limit of 1024 descriptors and room for 5000
/// allocations, the relay raises RLIMIT_NOFILE (while still root) to what every allocation being
/// dual needs; where the hard limit is too low to allow that, the log says how many allocations
/// fit.
#[test]
fn the_open_file_limit_is_raised_for_the_allocation_cap() {
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--realm",
        REALM,
        "--max-allocations",
        "5000",
        "--admin",
        "127.0.0.1:0",
    ];
    let soft_limit = |relay: &Relay| -> u64 {
        let limits =
            std::fs::read_to_string(format!("/proc/{}/limits", relay.pid())).expect("limits");
        limits
            .lines()
            .find(|line| line.starts_with("Max open files"))
            .and_then(|line| line.split_whitespace().nth(3))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no open-file limit in\n{limits}"))
    };
    // The hard limit this test may hand on (root without CAP_SYS_RESOURCE, as in containers,
    // cannot raise its own).
    let mut own = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) }, 0);
    let needed = 256 + 2 * 5000;
    let nofile = format!("--nofile=1024:{}", own.rlim_max);
    let relay = Relay::start_with(&["prlimit", &nofile], &args, 1);
    if own.rlim_max >= needed {
        assert!(soft_limit(&relay) >= needed, "{}", relay.log());
        assert!(
            relay.log().contains("raised the open-file limit"),
            "{}",
            relay.log()
        );
    } else {
        assert_eq!(soft_limit(&relay), own.rlim_max);
        assert!(
            relay.log().contains("fewer than --max-allocations"),
            "{}",
            relay.log()
        );
    }
    drop(relay);

    let relay = Relay::start_with(&["prlimit", "--nofile=1024:1024"], &args, 1);
    assert_eq!(soft_limit(&relay), 1024);
    assert!(
        relay.log().contains("allows about 384 allocations"),
        "{}",
        relay.log()
    );
}

/// Issue 12 item 1: receive errors never stop a listener from being read (it stays in its
/// SO_REUSEPORT group, so its clients would otherwise go unanswered for good): the worker logs,
/// backs off and reads on. Injected: the first 5 receives of the only worker fail with ENOMEM.
#[test]
fn receive_errors_do_not_stop_a_listener() {
    let relay = relay_with(&[
        "--workers",
        "1",
        "--user",
        "alice:wonderland",
        "--fault-receive-errors",
        "5",
    ]);
    let mut client = Client::new(relay.listener(), REALM);
    client.login("alice", "wonderland");
    client.allocate();
    let log = relay.log();
    assert!(
        log.contains("receive failed; retrying with backoff"),
        "{log}"
    );
    assert_eq!(relay.allocations().allocations.len(), 1);
}

/// Issue 12 item 1: a worker that dies (here a panic injected after its first client datagram)
/// takes the relay down with a failure exit, loudly, instead of leaving a relay whose
/// SO_REUSEPORT group lost a member and whose dead worker's clients are hashed elsewhere; the
/// service manager then restarts it (systemd: Restart=on-failure, or the watchdog).
#[test]
fn a_worker_panic_stops_the_relay_with_a_failure_exit() {
    let mut relay = relay_with(&["--workers", "1", "--fault-panic-worker-after", "1"]);
    let socket = UdpSocket::bind("127.0.0.1:0").expect("client socket");
    let tid = TransactionId([7; 12]);
    let request = MessageBuilder::new(Class::Request, Method::BINDING, tid).finish(None, true);
    socket
        .send_to(&request, relay.listener())
        .expect("send a Binding request");
    let status = relay
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the relay kept running:\n{}", relay.log()));
    assert!(!status.success(), "exit {status}");
    let log = relay.log();
    assert!(
        log.contains("a worker thread stopped unexpectedly"),
        "{log}"
    );
    assert!(
        log.contains("relay sockets released"),
        "clean shutdown first:\n{log}"
    );
}

/// Issue 13, refusals: every error response is counted by method and code in /metrics (no
/// per-user labels) and logged at debug with the client, the code's reason and the user.
#[test]
fn refusals_are_counted_by_method_and_code_and_logged() {
    let relay = Relay::start(&[
        "--listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--realm",
        REALM,
        "--user",
        "alice:wonderland",
        "--log-level",
        "debug",
    ]);
    let mut client = Client::new(relay.listener(), REALM);
    client.login("alice", "wonderland");
    client.allocate();
    // A private address: the safe-by-default policy refuses it (403).
    let denied: SocketAddr = "10.1.2.3:9000".parse().expect("addr");
    assert_eq!(
        client.request_error(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(denied)]
        ),
        Some(403)
    );
    assert_eq!(
        relay.metric("relay_error_responses_total{method=\"allocate\",code=\"401\"}"),
        1
    );
    assert_eq!(
        relay.metric("relay_error_responses_total{method=\"create_permission\",code=\"403\"}"),
        1
    );
    let refusal = relay
        .wait_for_log_line(&["request refused", "code=403"])
        .unwrap_or_else(|| panic!("no 403 refusal logged:\n{}", relay.log()));
    assert!(refusal.contains("user=\"alice\""), "{refusal}");
    assert!(
        refusal.contains("method=\"create_permission\""),
        "{refusal}"
    );
    // Which rule refused it, and the peer it concerned.
    assert!(
        refusal.contains("peer 10.1.2.3 denied by the peer policy: private"),
        "{refusal}"
    );
    // A quota refusal names the cap and its value.
    drop(relay);
    let relay = Relay::start(&[
        "--listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--realm",
        REALM,
        "--user",
        "alice:wonderland",
        "--max-allocations-per-user",
        "1",
        "--log-level",
        "debug",
    ]);
    let mut first = Client::new(relay.listener(), REALM);
    first.login("alice", "wonderland");
    first.allocate();
    let mut second = Client::new(relay.listener(), REALM);
    second.login("alice", "wonderland");
    assert_eq!(
        second.request_error(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]),
        Some(486)
    );
    let refusal = relay
        .wait_for_log_line(&["request refused", "code=486"])
        .unwrap_or_else(|| panic!("no 486 refusal logged:\n{}", relay.log()));
    assert!(
        refusal.contains("user alice holds --max-allocations-per-user 1"),
        "{refusal}"
    );
}

/// Issue 12 item 7: on the admin listener reads need the ctl header too (they list user names
/// and client addresses); only what `--metrics` also serves to anyone answers without it.
#[test]
fn admin_reads_need_the_ctl_header() {
    let relay = relay_with(&["--user", "alice:wonderland"]);
    let host = relay.admin;
    for path in ["/allocations", "/status"] {
        let bare = raw_http(
            relay.admin,
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        );
        assert!(bare.starts_with("HTTP/1.1 403"), "{path}: {bare}");
        assert!(bare.contains("X-Relay-Ctl"), "{bare}");
        let ctl = raw_http(
            relay.admin,
            &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nX-Relay-Ctl: 1\r\n\r\n"),
        );
        assert!(ctl.starts_with("HTTP/1.1 200"), "{path}: {ctl}");
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        relay_tests_http_get(relay.admin, path);
    }
    let (ok, _, stderr) = relay.ctl(&["allocations"]);
    assert!(ok, "{stderr}");
}

/// Issue 12 item 7: the admin listener serves a bounded number of connections; one over the cap
/// is answered 503 at once, clients that send half a request are dropped after the request
/// timeout, and `relay ctl` works again as soon as they are gone.
#[test]
fn admin_connections_are_capped_and_slow_clients_dropped() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let relay = relay_with(&["--user", "alice:wonderland"]);
    let started = Instant::now();
    let mut idle: Vec<std::net::TcpStream> = (0..relay::control::http::MAX_CONNECTIONS)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(relay.admin).expect("connect admin");
            // Half a request head: no blank line ever comes.
            s.write_all(b"GET /allocations HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .expect("write");
            s
        })
        .collect();
    // The extra one sends nothing: the relay answers at accept and closes without reading, so a
    // request it never read would turn its close into a reset that hides the answer.
    let extra = raw_http(relay.admin, "");
    assert!(extra.starts_with("HTTP/1.1 503"), "{extra}");
    assert!(extra.contains("too many admin connections"), "{extra}");
    let timeout = relay::control::http::REQUEST_TIMEOUT;
    for stream in &mut idle {
        stream
            .set_read_timeout(Some(timeout + Duration::from_secs(5)))
            .expect("timeout");
        let mut rest = Vec::new();
        // EOF (or a reset) once the relay drops it; a read timeout would fail here.
        match stream.read_to_end(&mut rest) {
            Ok(_) => assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest)),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
    let waited = started.elapsed();
    assert!(
        waited >= timeout - Duration::from_millis(500),
        "dropped after {waited:?}"
    );
    let (ok, stdout, stderr) = relay.ctl(&["status"]);
    assert!(ok, "relay ctl status after the flood: {stderr}");
    assert!(!stdout.is_empty());
}
