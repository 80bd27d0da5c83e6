//! A fleet of two relays (issue 13) in a namespace lab ([`Fleet`]): A and B share a TURN REST
//! secret and an identical alternate list naming both (each skips itself). A REST credential
//! works on both; draining A (`relay ctl drain`, SIGUSR1) sends a new Allocate on A to B with
//! a signed 300 Try Alternate, a client that follows it allocates on B, and A's existing
//! allocation keeps relaying both ways until it ends (Refresh LIFETIME 0) or the deadline
//! passes, after which A exits 0.
//!
//! aioice (0.8) does not follow ALTERNATE-SERVER: its `request_with_retry` retries only 401
//! and 438, so a 300 ends its Allocate with an error; only our own client is checked here.

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use relay::proto::{
    auth::{rest_password, LongTermKey},
    channel_data::ChannelData,
    stun::{Attribute, Class, Message, Method},
};
use relay_tests::{
    fastpath::FarEnds,
    lab::{
        Fleet, FLEET_A_IP, FLEET_A_RELAY_IP, FLEET_B_IP, FLEET_B_RELAY_IP, FLEET_CLIENT_A_IP,
        FLEET_CLIENT_B_IP, FLEET_PEER_A_IP,
    },
    require_root, Netns,
};
use support::{client::Client, Relay};

const REALM: &str = "fleet.test";
const SECRET: &str = "fleet-shared-rest-secret";
const PORT: u16 = 3478;
const CHANNEL: u16 = 0x4000;

fn a_listener() -> SocketAddr {
    SocketAddr::new(FLEET_A_IP.parse().expect("ip"), PORT)
}

fn b_listener() -> SocketAddr {
    SocketAddr::new(FLEET_B_IP.parse().expect("ip"), PORT)
}

/// One fleet member: the configuration is the same for both but for the addresses of the
/// host it runs on (the alternate list names both; each skips its own listener).
fn start(ns: &Netns, listen: SocketAddr, relay_ip: &str) -> Relay {
    start_with(ns, listen, relay_ip, &[])
}

/// [`start`] with extra flags (the kernel fast path).
fn start_with(ns: &Netns, listen: SocketAddr, relay_ip: &str, extra: &[&str]) -> Relay {
    let listen = listen.to_string();
    let (a, b) = (a_listener().to_string(), b_listener().to_string());
    let mut args = vec![
        "--listen",
        &listen,
        "--relay-ip",
        relay_ip,
        "--realm",
        REALM,
        "--auth-secret",
        SECRET,
        "--allow-peer",
        "198.18.16.0/20",
        "--alternate-server",
        &a,
        "--alternate-server",
        &b,
        "--workers",
        "2",
        "--log-level",
        "info",
    ];
    args.extend_from_slice(extra);
    Relay::start_with(&["ip", "netns", "exec", ns.name()], &args, 1)
}

/// The kernel's share of what a relay relayed, both directions.
fn kernel_packets(relay: &Relay) -> (u64, u64) {
    let metric = |direction: &str| {
        relay.metric(&format!(
            "relay_relayed_packets_total{{path=\"kernel\",direction=\"{direction}\"}}"
        ))
    };
    (metric("to_peer"), metric("to_client"))
}

/// The relay's programs attached in `ns` (`bpftool net show`), one per line.
fn kernel_programs_in(ns: &Netns) -> String {
    let out = ns
        .command("bpftool")
        .args(["net", "show"])
        .output()
        .expect("bpftool net show");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("relay_"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A TURN REST credential (valid for an hour) as a web service would mint it.
fn rest_credential() -> (String, String) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let username = format!("{}:alice", now + 3600);
    let password = rest_password(SECRET.as_bytes(), &username).expect("hmac");
    (username, password)
}

/// A UDP socket bound inside `ns`.
fn socket_in(ns: &Netns, ip: &str) -> UdpSocket {
    let addr: SocketAddr = SocketAddr::new(ip.parse().expect("ip"), 0);
    ns.run_inside(move || UdpSocket::bind(addr).expect("bind in the namespace"))
}

/// A logged-in client in the client namespace, talking to `server` from `ip`.
fn client(lab: &Fleet, ip: &str, server: SocketAddr, (user, pass): (&str, &str)) -> Client {
    let mut client = Client::with_socket(socket_in(&lab.client, ip), server, REALM);
    client.login(user, pass);
    client
}

/// ChannelData from the client reaches the peer from the relayed address, and the peer's
/// answer comes back to the client as ChannelData on the same channel.
fn relays_both_ways(client: &Client, peer: &UdpSocket, relayed: SocketAddr, tag: &str) {
    let out = format!("to the peer: {tag}");
    client.send_raw(
        &ChannelData {
            channel: CHANNEL,
            data: out.as_bytes(),
        }
        .encode(false),
    );
    let mut buf = [0u8; 2048];
    let (n, from) = peer.recv_from(&mut buf).expect("the peer receives");
    assert_eq!(from, relayed, "{tag}: from the relayed address");
    assert_eq!(&buf[..n], out.as_bytes(), "{tag}");

    let back = format!("to the client: {tag}");
    peer.send_to(back.as_bytes(), relayed).expect("peer sends");
    let got = client.recv().expect("the client receives");
    let data = ChannelData::decode(&got).expect("ChannelData");
    assert_eq!(
        (data.channel, data.data),
        (CHANNEL, back.as_bytes()),
        "{tag}"
    );
}

/// A peer socket in the peer namespace, on A's side.
fn peer_of_a(lab: &Fleet) -> UdpSocket {
    let peer = socket_in(&lab.peer, FLEET_PEER_A_IP);
    peer.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    peer
}

/// The status code of `GET path` on an HTTP endpoint inside `ns`.
fn http_status(ns: &Netns, addr: SocketAddr, path: &str) -> u16 {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let answer = ns.run_inside(move || {
        let mut stream =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream.write_all(request.as_bytes()).expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read");
        answer
    });
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("malformed HTTP answer: {answer}"))
}

/// `relay ctl status --json`, parsed.
fn status(relay: &Relay) -> serde_json::Value {
    let (ok, stdout, stderr) = relay.ctl(&["status", "--json"]);
    assert!(ok, "relay ctl status: {stderr}");
    serde_json::from_str(&stdout).expect("status JSON")
}

/// A new client's Allocate on A: the 401, then a signed 300 naming B; following it allocates
/// on B with the same credential. Returns the client on B and its relayed address.
fn sent_to_b(lab: &Fleet, credential: (&str, &str)) -> (Client, SocketAddr) {
    let mut newcomer = client(lab, FLEET_CLIENT_A_IP, a_listener(), credential);
    let answer = newcomer.request(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
    let msg = Message::decode(&answer).expect("answer decodes");
    assert_eq!(msg.class(), Class::Error);
    assert_eq!(msg.error_code(), Some(300), "{msg:?}");
    let key = LongTermKey::derive(credential.0, REALM, credential.1);
    assert_eq!(
        msg.verify_integrity(key.as_bytes()),
        Ok(()),
        "the 300 is signed (RFC 8489 §10)"
    );
    let alternate = msg.alternate_server().expect("ALTERNATE-SERVER");
    assert_eq!(alternate, b_listener(), "sent to B, never back to A");

    // Follow it: the same credential, a new transaction with B (its own nonce).
    let mut follower = client(lab, FLEET_CLIENT_B_IP, alternate, credential);
    let relayed = follower.allocate();
    assert_eq!(relayed.ip().to_string(), FLEET_B_RELAY_IP, "allocated on B");
    (follower, relayed)
}

#[test]
fn ctl_drain_sends_new_clients_to_b_and_a_exits_after_its_last_allocation() {
    require_root();
    let lab = Fleet::new();
    // A forwards its channels in the kernel (XDP on both of its interfaces; the far ends pass
    // what it redirects to them), so the drain is checked on the fast path too.
    let (ca, pa, ra, xa) = (lab.dev("ca"), lab.dev("pa"), lab.dev("ra"), lab.dev("xa"));
    let _far = FarEnds::attach(&[(&lab.client, &ca), (&lab.peer, &pa)]);
    let mut a = start_with(
        &lab.relay_a,
        a_listener(),
        FLEET_A_RELAY_IP,
        &["--fastpath", "xdp", "--interface", &ra, "--interface", &xa],
    );
    let mut b = start(&lab.relay_b, b_listener(), FLEET_B_RELAY_IP);
    let (user, pass) = rest_credential();
    let credential = (user.as_str(), pass.as_str());

    // A client of A relaying to the peer over a channel.
    let peer = peer_of_a(&lab);
    let peer_addr = peer.local_addr().expect("peer address");
    let mut first = client(&lab, FLEET_CLIENT_A_IP, a_listener(), credential);
    let relayed = first.allocate();
    assert_eq!(relayed.ip().to_string(), FLEET_A_RELAY_IP);
    first.bind_channel(CHANNEL, peer_addr);
    relays_both_ways(&first, &peer, relayed, "before the drain");

    // The same REST credential works on B (shared secret, no shared state).
    let mut on_b = client(&lab, FLEET_CLIENT_B_IP, b_listener(), credential);
    assert_eq!(on_b.allocate().ip().to_string(), FLEET_B_RELAY_IP);
    on_b.delete();

    let running = status(&a);
    assert_eq!(running["draining"], false);
    assert_eq!(running["ready"], true);
    assert_eq!(http_status(&lab.relay_a, a.admin, "/readyz"), 200);

    // Drain A.
    let (ok, stdout, stderr) = a.ctl(&["drain"]);
    assert!(ok, "relay ctl drain: {stderr}");
    assert!(stdout.contains("draining"), "{stdout}");
    let draining = status(&a);
    assert_eq!(draining["draining"], true, "{draining}");
    assert_eq!(draining["ready"], false);
    assert_eq!(draining["allocations"], 1, "{draining}");
    assert!(draining.get("deadline_in_secs").is_none(), "{draining}");
    let (ok, text, _) = a.ctl(&["status"]);
    assert!(
        ok && text.contains("draining") && text.contains("allocations: 1"),
        "{text}"
    );
    assert_eq!(a.metric("relay_draining"), 1);
    assert_eq!(a.metric("relay_allocations"), 1);
    assert_eq!(http_status(&lab.relay_a, a.admin, "/readyz"), 503);
    assert_eq!(http_status(&lab.relay_a, a.admin, "/healthz"), 200);
    // B is not draining.
    assert_eq!(status(&b)["draining"], false);

    // A new client is sent to B and allocates there.
    let (_follower, on_b_relayed) = sent_to_b(&lab, credential);
    assert_eq!(on_b_relayed.ip().to_string(), FLEET_B_RELAY_IP);

    // A's existing allocation keeps working: Refresh, a new permission, data both ways.
    let refreshed = first.request(Method::REFRESH, &[Attribute::Lifetime(600)]);
    assert_eq!(
        Message::decode(&refreshed).map(|m| m.class()),
        Ok(Class::Success)
    );
    let other_peer = SocketAddr::new(FLEET_PEER_A_IP.parse().expect("ip"), 9);
    assert_eq!(
        first.request_error(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(other_peer)]
        ),
        None
    );
    let kernel_before = kernel_packets(&a);
    for round in 0..20 {
        relays_both_ways(&first, &peer, relayed, &format!("draining, round {round}"));
    }
    let kernel_after = kernel_packets(&a);
    assert!(
        kernel_after.0 > kernel_before.0 && kernel_after.1 > kernel_before.1,
        "the kernel path relays while draining: {kernel_before:?} -> {kernel_after:?}\n{}",
        a.log()
    );
    assert!(a.is_running(), "A waits for its last allocation");

    // Its last allocation ends: A stops on its own, cleanly.
    first.delete();
    let exit = a
        .wait_exit(Duration::from_secs(10))
        .expect("A exits once its last allocation ended");
    assert!(exit.success(), "exit {exit:?}:\n{}", a.log());
    let log = a.log();
    assert!(log.contains("drained: no allocation left"), "{log}");
    assert!(log.contains("relay stopped"), "{log}");
    assert!(log.contains("fast path detached"), "{log}");
    assert_eq!(
        kernel_programs_in(&lab.relay_a),
        "",
        "nothing left in the kernel"
    );
    assert!(b.is_running(), "B goes on");
}

#[test]
fn sigusr1_drains_and_the_deadline_stops_a_with_an_allocation_left() {
    require_root();
    let lab = Fleet::new();
    let mut a = start(&lab.relay_a, a_listener(), FLEET_A_RELAY_IP);
    let _b = start(&lab.relay_b, b_listener(), FLEET_B_RELAY_IP);
    let (user, pass) = rest_credential();
    let credential = (user.as_str(), pass.as_str());

    let peer = peer_of_a(&lab);
    let mut first = client(&lab, FLEET_CLIENT_A_IP, a_listener(), credential);
    let relayed = first.allocate();
    first.bind_channel(CHANNEL, peer.local_addr().expect("peer address"));

    let pid = i32::try_from(a.pid()).expect("pid");
    // SAFETY: kill only sends SIGUSR1 to the relay this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
    let mut draining = false;
    for _ in 0..50 {
        if status(&a)["draining"] == true {
            draining = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(draining, "SIGUSR1 drains:\n{}", a.log());
    assert!(a.log().contains("draining (SIGUSR1)"), "{}", a.log());

    let _on_b = sent_to_b(&lab, credential);
    relays_both_ways(&first, &peer, relayed, "draining after SIGUSR1");

    // A deadline that is not a duration is a CLI error, before anything is sent.
    let (ok, _, stderr) = a.ctl(&["drain", "--deadline", "soon"]);
    assert!(
        !ok && stderr.contains("invalid duration `soon`"),
        "{stderr}"
    );
    assert!(status(&a).get("deadline_in_secs").is_none());

    // A deadline: A stops with the allocation still there, exit 0.
    let (ok, _, stderr) = a.ctl(&["drain", "--deadline", "2s"]);
    assert!(ok, "{stderr}");
    let with_deadline = status(&a);
    assert!(
        with_deadline["deadline_in_secs"]
            .as_u64()
            .is_some_and(|s| s <= 2),
        "{with_deadline}"
    );
    assert!(a.metric_opt("relay_drain_deadline_seconds").is_some());
    relays_both_ways(&first, &peer, relayed, "before the deadline");
    let exit = a
        .wait_exit(Duration::from_secs(10))
        .expect("A exits at the deadline");
    assert!(exit.success(), "exit {exit:?}:\n{}", a.log());
    let log = a.log();
    assert!(log.contains("drain deadline passed"), "{log}");
    assert!(log.contains("relay stopped"), "{log}");
}
