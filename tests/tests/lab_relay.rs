//! `relay serve` in the three-namespace lab (test-lab.md) with real clients: the socket path on
//! its own, the kernel fast path (XDP and TC), the per-allocation toggle, and what happens to
//! kernel forwarding when an allocation goes away.
//!
//! client ns 198.18.1.2 <-> relay ns 198.18.1.1 (listener) / 198.18.2.1 (relayed) <-> peer ns
//! 198.18.2.2, and the same in 2001:2::/48. The client has no route to the peer: whatever
//! arrives crossed the relay.

mod support;

use std::{
    net::{SocketAddr, UdpSocket},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use relay_tests::capture::{ip_fields, Capture, IpFields};
use relay_tests::{
    fastpath::FarEnds,
    lab::{
        ThreeHosts, CLIENT_IP, PEER_IP, PEER_IP6, RELAY_CLIENT_SIDE_IP, RELAY_CLIENT_SIDE_IP6,
        RELAY_PEER_SIDE_IP, RELAY_PEER_SIDE_IP6,
    },
    require_root,
};
use support::{
    client::Client,
    echo::{round_trips, Echo},
    uclient, Relay,
};

const REALM: &str = "lab.test";
const PORT: &str = "3478";

fn start_relay(lab: &ThreeHosts, v6: bool, extra: &[&str]) -> Relay {
    let listen = if v6 {
        format!("[{RELAY_CLIENT_SIDE_IP6}]:{PORT}")
    } else {
        format!("{RELAY_CLIENT_SIDE_IP}:{PORT}")
    };
    start_relay_on(lab, v6, &[listen.as_str()], extra)
}

/// The relay with the kernel fast path in `mode` on both of its lab interfaces.
fn start_kernel_relay(lab: &ThreeHosts, v6: bool, mode: &str, extra: &[&str]) -> Relay {
    let (rc, rp) = (lab.relay_client_if.clone(), lab.relay_peer_if.clone());
    let mut args = vec!["--fastpath", mode, "--interface", &rc, "--interface", &rp];
    args.extend_from_slice(extra);
    start_relay(lab, v6, &args)
}

/// The relay listening on every address of `listen`.
fn start_relay_on(lab: &ThreeHosts, v6: bool, listen: &[&str], extra: &[&str]) -> Relay {
    start_relay_with_env(lab, v6, listen, extra, &[])
}

/// [`start_relay_on`] with `NAME=VALUE` environment variables for the relay.
fn start_relay_with_env(
    lab: &ThreeHosts,
    v6: bool,
    listen: &[&str],
    extra: &[&str],
    env: &[&str],
) -> Relay {
    let relay_ns = lab.relay.name().to_owned();
    let (relay_ip, peers) = if v6 {
        (RELAY_PEER_SIDE_IP6, "2001:2:0:2::/64")
    } else {
        (RELAY_PEER_SIDE_IP, "198.18.2.0/24")
    };
    let mut args = Vec::new();
    for addr in listen {
        args.extend_from_slice(&["--listen", addr]);
    }
    args.extend_from_slice(&[
        "--relay-ip",
        relay_ip,
        "--realm",
        REALM,
        "--user",
        "alice:wonderland",
        "--allow-peer",
        peers,
        "--legacy-channels",
    ]);
    args.extend_from_slice(extra);
    let mut prefix = vec!["ip", "netns", "exec", &relay_ns, "env"];
    prefix.extend_from_slice(env);
    Relay::start_with(&prefix, &args, 1)
}

fn kernel_programs_in(ns: &relay_tests::Netns) -> String {
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

/// coturn's client and echo peer through the relay; returns the stopped relay's log.
fn uclient_through(lab: &ThreeHosts, relay: &Relay, v6: bool) -> support::UclientReport {
    let server = if v6 {
        RELAY_CLIENT_SIDE_IP6
    } else {
        RELAY_CLIENT_SIDE_IP
    };
    uclient_to(lab, relay, v6, server)
}

/// [`uclient_through`], contacting the relay at `server`.
fn uclient_to(lab: &ThreeHosts, relay: &Relay, v6: bool, server: &str) -> support::UclientReport {
    uclient_with(lab, relay, v6, server, &[])
}

/// [`uclient_to`] with extra uclient flags (e.g. `-s`: Send/Data indications).
fn uclient_with(
    lab: &ThreeHosts,
    relay: &Relay,
    v6: bool,
    server: &str,
    extra: &[&str],
) -> support::UclientReport {
    let peer_ip = if v6 { PEER_IP6 } else { PEER_IP };
    support::uclient_echo(
        relay,
        (lab.client.name(), lab.peer.name()),
        (peer_ip, server),
        v6,
        extra,
    )
}

#[test]
fn uclient_across_the_lab_on_the_socket_path() {
    require_root();
    let lab = ThreeHosts::new();
    assert!(!lab.client_reaches_peer());
    let relay = start_relay(&lab, false, &["--fastpath", "off"]);
    uclient_through(&lab, &relay, false);
    assert_eq!(
        relay.metric("relay_relayed_packets_total{path=\"socket\",direction=\"to_peer\"}"),
        1000
    );
    assert_eq!(
        relay.metric("relay_relayed_packets_total{path=\"kernel\",direction=\"to_peer\"}"),
        0
    );
}

#[test]
fn uclient_across_the_lab_on_the_socket_path_ipv6() {
    require_root();
    let lab = ThreeHosts::new();
    let relay = start_relay(&lab, true, &["--fastpath", "off"]);
    uclient_through(&lab, &relay, true);
}

/// The kernel carries every steady-state ChannelData datagram; the relay sockets see none.
fn kernel_path_carries_uclient(mode: &str, v6: bool) {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    lab.add_static_neighbours();
    let _far = FarEnds::of(&lab);
    let relay = start_kernel_relay(&lab, v6, mode, &[]);
    uclient_through(&lab, &relay, v6);
    let metric = |path: &str, direction: &str| {
        relay.metric(&format!(
            "relay_relayed_packets_total{{path=\"{path}\",direction=\"{direction}\"}}"
        ))
    };
    assert_eq!(metric("kernel", "to_peer"), 1000, "{}", relay.log());
    assert_eq!(metric("kernel", "to_client"), 1000);
    assert_eq!(metric("socket", "to_peer"), 0);
    assert_eq!(metric("socket", "to_client"), 0);
    // Checksums were right: neither end dropped anything as corrupt.
    for ns in [&lab.client, &lab.peer] {
        let field = "InCsumErrors";
        let errors = if v6 {
            ns.snmp6_counter("Udp6InCsumErrors")
        } else {
            ns.udp_counter(field)
        };
        assert_eq!(errors, 0, "{field} in {}", ns.name());
    }
    let log = relay.stop();
    assert!(log.contains("fast path verdicts:"), "{log}");
    assert!(log.contains("forward_to_peer="), "{log}");
    assert!(log.contains("fast path detached"), "{log}");
    // Nothing stays behind, and a restart attaches cleanly.
    assert_eq!(kernel_programs_in(&lab.relay), "");
    let again = start_kernel_relay(&lab, v6, mode, &[]);
    let log = again.stop();
    assert_eq!(log.matches("fast path attached").count(), 2, "{log}");
    assert_eq!(kernel_programs_in(&lab.relay), "");
}

#[test]
fn xdp_fast_path_carries_uclient_traffic() {
    kernel_path_carries_uclient("xdp", false);
}

#[test]
fn xdp_fast_path_carries_uclient_traffic_ipv6() {
    kernel_path_carries_uclient("xdp", true);
}

#[test]
fn tc_fast_path_carries_uclient_traffic() {
    kernel_path_carries_uclient("tc", false);
}

/// A second address on the relay's client-side interface, for a second specific listener.
const SECOND_LISTENER_IP: &str = "198.18.1.10";

/// How the relay listens in [`kernel_path_behind_listener`].
#[derive(Clone, Copy, Debug)]
enum Listen {
    /// `0.0.0.0:3478` or `[::]:3478`.
    Wildcard,
    /// `198.18.1.1:3478` and `198.18.1.10:3478`; the client contacts the second.
    TwoSpecific,
}

/// uclient through the kernel fast path behind a wildcard or a second specific listener, with
/// IP forwarding off everywhere and neighbours learnt the ordinary way (no static entries):
/// zero loss both ways, the kernel carries (almost) everything, with the address the client
/// contacted as the source of everything it receives.
fn kernel_path_behind_listener(mode: &str, v6: bool, listen: Listen) {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    let _far = FarEnds::of(&lab);
    let (rc, rp) = (lab.relay_client_if.clone(), lab.relay_peer_if.clone());
    let (listeners, server): (Vec<String>, &str) = match (listen, v6) {
        (Listen::Wildcard, false) => (vec![format!("0.0.0.0:{PORT}")], RELAY_CLIENT_SIDE_IP),
        (Listen::Wildcard, true) => (vec![format!("[::]:{PORT}")], RELAY_CLIENT_SIDE_IP6),
        (Listen::TwoSpecific, _) => {
            lab.relay.ip(&[
                "addr",
                "add",
                &format!("{SECOND_LISTENER_IP}/24"),
                "dev",
                &rc,
            ]);
            (
                vec![
                    format!("{RELAY_CLIENT_SIDE_IP}:{PORT}"),
                    format!("{SECOND_LISTENER_IP}:{PORT}"),
                ],
                SECOND_LISTENER_IP,
            )
        }
    };
    let listeners: Vec<&str> = listeners.iter().map(String::as_str).collect();
    let relay = start_relay_on(
        &lab,
        v6,
        &listeners,
        &["--fastpath", mode, "--interface", &rc, "--interface", &rp],
    );
    uclient_to(&lab, &relay, v6, server);
    let metric = |path: &str, direction: &str| {
        relay.metric(&format!(
            "relay_relayed_packets_total{{path=\"{path}\",direction=\"{direction}\"}}"
        ))
    };
    let (kernel_up, kernel_down) = (metric("kernel", "to_peer"), metric("kernel", "to_client"));
    let (socket_up, socket_down) = (metric("socket", "to_peer"), metric("socket", "to_client"));
    assert_eq!(kernel_up + socket_up, 1000, "{}", relay.log());
    assert_eq!(kernel_down + socket_down, 1000, "{}", relay.log());
    // Almost none on the sockets: at most the first datagrams while a neighbour resolves.
    assert!(
        socket_up <= 10 && socket_down <= 10,
        "{listen:?}: socket path carried {socket_up} up, {socket_down} down\n{}",
        relay.log()
    );
    // Every allocation is keyed by the address the client contacted, never a wildcard.
    let (ok, allocations, err) = relay.ctl(&["allocations", "--json"]);
    assert!(ok, "relay ctl allocations: {err}");
    assert!(
        !allocations.contains("0.0.0.0") && !allocations.contains("[::]"),
        "{allocations}"
    );
    assert!(allocations.contains(server), "{allocations}");
}

#[test]
fn xdp_fast_path_behind_a_wildcard_listener() {
    kernel_path_behind_listener("xdp", false, Listen::Wildcard);
}

#[test]
fn xdp_fast_path_behind_a_wildcard_listener_ipv6() {
    kernel_path_behind_listener("xdp", true, Listen::Wildcard);
}

#[test]
fn tc_fast_path_behind_a_wildcard_listener() {
    kernel_path_behind_listener("tc", false, Listen::Wildcard);
}

#[test]
fn tc_fast_path_behind_a_wildcard_listener_ipv6() {
    kernel_path_behind_listener("tc", true, Listen::Wildcard);
}

#[test]
fn xdp_fast_path_behind_two_specific_listeners() {
    kernel_path_behind_listener("xdp", false, Listen::TwoSpecific);
}

#[test]
fn toggling_the_fast_path_moves_traffic_without_losing_the_allocation() {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    lab.add_static_neighbours();
    let _far = FarEnds::of(&lab);
    let relay = start_kernel_relay(&lab, false, "xdp", &[]);
    let echo = Echo::start(&lab);
    let mut client = lab_client(&lab, false);
    client.allocate();
    client.bind_channel(0x4000, echo.addr);

    let list = relay.allocations();
    assert_eq!(list.allocations.len(), 1);
    let id = list.allocations[0].id.to_string();
    assert_eq!(list.allocations[0].path, "kernel");

    // Kernel path.
    assert_eq!(round_trips(&client, 0x4000, 100, "kernel"), 100);
    let a = &relay.allocations().allocations[0];
    assert_eq!(
        (a.kernel.to_peer_packets, a.kernel.to_client_packets),
        (100, 100)
    );
    assert_eq!(a.socket.packets(), 0);

    // Off: the same allocation and channel, now through the relay socket.
    let (ok, _, stderr) = relay.ctl(&["fastpath", "off", &id]);
    assert!(ok, "{stderr}");
    assert_eq!(round_trips(&client, 0x4000, 100, "socket"), 100);
    let a = &relay.allocations().allocations[0];
    assert_eq!(a.path, "socket");
    assert_eq!(
        (a.socket.to_peer_packets, a.socket.to_client_packets),
        (100, 100)
    );
    assert_eq!(
        a.kernel.to_peer_packets, 100,
        "the kernel forwarded while off"
    );

    // On again: back to the kernel.
    let (ok, _, stderr) = relay.ctl(&["fastpath", "on", &id]);
    assert!(ok, "{stderr}");
    assert_eq!(round_trips(&client, 0x4000, 100, "again"), 100);
    let a = &relay.allocations().allocations[0];
    assert_eq!(a.path, "kernel");
    assert_eq!(a.kernel.to_peer_packets, 200);
    assert_eq!(a.socket.to_peer_packets, 100);

    // Deleted: the kernel forwards nothing more for it (real traffic, counted at the peer).
    client.delete();
    let before = echo.received.load(Ordering::Relaxed);
    assert_eq!(round_trips(&client, 0x4000, 20, "deleted"), 0);
    assert_eq!(echo.received.load(Ordering::Relaxed), before);
    assert!(relay.allocations().allocations.is_empty());

    // Default off: a new allocation starts on the socket path.
    let (ok, _, stderr) = relay.ctl(&["fastpath", "default", "off"]);
    assert!(ok, "{stderr}");
    let mut second = lab_client(&lab, false);
    second.allocate();
    second.bind_channel(0x4001, echo.addr);
    assert_eq!(round_trips(&second, 0x4001, 50, "default-off"), 50);
    let list = relay.allocations();
    assert!(!list.fastpath_default);
    let a = &list.allocations[0];
    assert_eq!((a.path.as_str(), a.kernel.packets()), ("socket", 0));
    assert_eq!(a.socket.to_peer_packets, 50);
    // An unknown allocation is named in the error.
    let (ok, _, stderr) = relay.ctl(&["fastpath", "on", "999"]);
    assert!(!ok);
    assert!(stderr.contains("no allocation 999"), "{stderr}");
}

/// After a permission or a channel expires, neither the kernel nor the socket path forwards
/// anything more for it (real traffic; lifetimes shortened with the hidden test flags).
#[test]
fn expired_permissions_and_channels_stop_kernel_forwarding() {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    lab.add_static_neighbours();
    let _far = FarEnds::of(&lab);
    let echo = Echo::start(&lab);
    let (rc, rp) = (lab.relay_client_if.clone(), lab.relay_peer_if.clone());
    for lifetime_flag in ["--permission-lifetime", "--channel-lifetime"] {
        let relay = start_relay(
            &lab,
            false,
            &[
                "--fastpath",
                "xdp",
                "--interface",
                &rc,
                "--interface",
                &rp,
                lifetime_flag,
                "2",
            ],
        );
        let mut client = lab_client(&lab, false);
        client.allocate();
        client.bind_channel(0x4000, echo.addr);
        assert_eq!(
            round_trips(&client, 0x4000, 20, "live"),
            20,
            "{lifetime_flag}"
        );
        let a = &relay.allocations().allocations[0];
        assert_eq!(a.kernel.to_peer_packets, 20, "{lifetime_flag}");

        std::thread::sleep(Duration::from_millis(2500));
        let before = echo.received.load(Ordering::Relaxed);
        assert_eq!(
            round_trips(&client, 0x4000, 10, "expired"),
            0,
            "{lifetime_flag}"
        );
        assert_eq!(
            echo.received.load(Ordering::Relaxed),
            before,
            "{lifetime_flag}"
        );
        let a = &relay.allocations().allocations[0];
        assert_eq!(
            a.kernel.to_peer_packets, 20,
            "{lifetime_flag}: kernel forwarded"
        );
        assert_eq!(
            a.socket.to_peer_packets, 0,
            "{lifetime_flag}: socket forwarded"
        );
        drop(relay);
    }
}

/// coturn's client-to-client mode (`-y`): pairs of clients of this relay, each sending to the
/// other's relayed address over channels, as WebRTC endpoints forced through one TURN server
/// do. Zero loss; with the kernel fast path the hairpin stays in the kernel.
fn client_to_client(mode: &str) {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    let _far = (mode != "off").then(|| FarEnds::of(&lab));
    let relay = start_kernel_relay(&lab, false, mode, &[]);
    let client_ns = lab.client.name().to_owned();
    let report = uclient(
        &["ip", "netns", "exec", &client_ns],
        &[
            "-u",
            "alice",
            "-w",
            "wonderland",
            "-y",
            "-n",
            "200",
            "-m",
            "4",
            "-l",
            "160",
            "-c",
            "-p",
            PORT,
            RELAY_CLIENT_SIDE_IP,
        ],
    );
    assert_eq!(report.lost, Some(0), "{}\n{}", report.output, relay.log());
    assert!(report.sent >= 800, "{}", report.output);
    assert_eq!(report.sent, report.received, "{}", report.output);
    let metric = |path: &str, direction: &str| {
        relay.metric(&format!(
            "relay_relayed_packets_total{{path=\"{path}\",direction=\"{direction}\"}}"
        ))
    };
    let (kernel, socket) = (metric("kernel", "to_peer"), metric("socket", "to_peer"));
    if mode == "off" {
        assert_eq!((kernel, socket), (0, report.sent), "{}", relay.log());
    } else {
        // Each datagram leaves one allocation and reaches the other inside the kernel.
        assert!(
            kernel + 10 >= report.sent && socket <= 10,
            "kernel {kernel}, socket {socket} of {}\n{}",
            report.sent,
            relay.log()
        );
        assert_eq!(metric("kernel", "to_client"), kernel);
        let log = relay.stop();
        assert!(log.contains("forward_hairpin="), "{log}");
    }
}

#[test]
fn client_to_client_on_the_socket_path() {
    client_to_client("off");
}

#[test]
fn client_to_client_through_the_xdp_fast_path() {
    client_to_client("xdp");
}

#[test]
fn client_to_client_through_the_tc_fast_path() {
    client_to_client("tc");
}

/// Permissions for the relay's own relayed-address IP are allowed (client-to-client), but only
/// live relayed ports are destinations: every other port of every host address, and addresses
/// the host gains at runtime, stay out of reach.
#[test]
fn only_live_relayed_ports_of_the_host_are_peers() {
    require_root();
    let lab = ThreeHosts::new();
    let relay = start_relay(&lab, false, &["--fastpath", "off"]);
    let (mut a, mut b) = (lab_client(&lab, false), lab_client(&lab, false));
    let relayed_a = a.allocate();
    let relayed_b = b.allocate();
    // A service on the relay host, on the relay address: never reachable through the relay.
    let service = lab.relay.run_inside(|| {
        let socket = UdpSocket::bind((RELAY_PEER_SIDE_IP, 0)).expect("service socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .expect("timeout");
        socket
    });
    let service_addr = service.local_addr().expect("service address");
    use relay::proto::stun::{Attribute, Method};
    let permit = |c: &mut Client, ip: &str| {
        let peer: SocketAddr = format!("{ip}:9").parse().expect("addr");
        c.request_error(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(peer)],
        )
    };
    // The relayed-address IP: a permission is fine (per IP, RFC 8656 §9).
    assert_eq!(permit(&mut a, RELAY_PEER_SIDE_IP), None);
    assert_eq!(permit(&mut b, RELAY_PEER_SIDE_IP), None);
    // A channel to the other allocation's relayed address works, to any other port: 403.
    a.bind_channel(0x4001, relayed_b);
    let bind = |c: &mut Client, channel: u16, peer: SocketAddr| {
        c.request_error(
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(channel),
                Attribute::XorPeerAddress(peer),
            ],
        )
    };
    assert_eq!(bind(&mut a, 0x4002, service_addr), Some(403));
    let admin: SocketAddr = format!("{RELAY_PEER_SIDE_IP}:3479").parse().expect("addr");
    assert_eq!(bind(&mut a, 0x4003, admin), Some(403));
    // Send indications: to the live relayed address they arrive (as a Data indication at B),
    // to the service they never do.
    a.send_indication(service_addr, b"knock knock");
    let mut buf = [0u8; 2048];
    assert!(
        service.recv_from(&mut buf).is_err(),
        "a datagram reached a service on the relay host"
    );
    b.request_error(
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(relayed_a)],
    );
    a.send_indication(relayed_b, b"hello b");
    let got = b.recv().expect("B hears from A");
    assert!(
        got.windows(7).any(|w| w == b"hello b"),
        "B got {got:?} instead of A's data"
    );
    // Any other address of the host: 403, including the listener's, and one added at runtime
    // inside a range --allow-peer allows.
    assert_eq!(permit(&mut a, RELAY_CLIENT_SIDE_IP), Some(403));
    assert_eq!(
        permit(&mut a, "198.18.2.77"),
        None,
        "not a host address yet"
    );
    lab.relay
        .ip(&["addr", "add", "198.18.2.78/24", "dev", &lab.relay_peer_if]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match permit(&mut a, "198.18.2.78") {
            Some(403) => break,
            other => assert!(
                Instant::now() < deadline,
                "a runtime address is still a peer: {other:?}\n{}",
                relay.log()
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // When B's allocation ends, its relayed address is just another port of the host.
    assert_eq!(
        b.request_error(Method::REFRESH, &[Attribute::Lifetime(0)]),
        None
    );
    assert_eq!(bind(&mut a, 0x4004, relayed_b), Some(403));
}

/// What the kernel path and the socket path put in the IP header are the same (README "IP
/// header fields"): TTL / hop limit 64, DSCP and ECN 0 whatever the client sent, IPv4 DF,
/// IPv6 flow label 0. Checked on the wire at both far ends, for one allocation moved between
/// the paths.
fn both_paths_write_the_same_ip_header(v6: bool) {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    lab.add_static_neighbours();
    let _far = FarEnds::of(&lab);
    let relay = start_kernel_relay(&lab, v6, "xdp", &[]);
    let echo = Echo::start_in(&lab.peer, if v6 { PEER_IP6 } else { PEER_IP });
    let (server, client_ip): (SocketAddr, &'static str) = if v6 {
        (
            format!("[{RELAY_CLIENT_SIDE_IP6}]:{PORT}")
                .parse()
                .expect("addr"),
            relay_tests::lab::CLIENT_IP6,
        )
    } else {
        (
            format!("{RELAY_CLIENT_SIDE_IP}:{PORT}")
                .parse()
                .expect("addr"),
            CLIENT_IP,
        )
    };
    let socket = lab.client.run_inside(move || {
        let socket = UdpSocket::bind((client_ip, 0)).expect("client socket");
        // Expedited forwarding + ECT(0) on everything the client sends: neither path copies it.
        let tos: libc::c_int = 0xba;
        let (level, option) = if v6 {
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS)
        } else {
            (libc::IPPROTO_IP, libc::IP_TOS)
        };
        // SAFETY: setsockopt reads one c_int of the length passed; the fd is open.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                level,
                option,
                (&tos as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "set TOS");
        socket
    });
    let client_port = socket.local_addr().expect("client address").port();
    let mut client = Client::with_socket(socket, server, REALM);
    client.login("alice", "wonderland");
    if v6 {
        client.allocate_ipv6();
    } else {
        client.allocate();
    }
    client.bind_channel(0x4000, echo.addr);
    let id = relay.allocations().allocations[0].id.to_string();

    let (client_if, peer_if) = (lab.client_if.clone(), lab.peer_if.clone());
    let capture_client = lab
        .client
        .run_inside(move || Capture::open(&client_if).expect("capture on the client"));
    let capture_peer = lab
        .peer
        .run_inside(move || Capture::open(&peer_if).expect("capture on the peer"));
    let seen = |tag: &str| {
        assert_eq!(round_trips(&client, 0x4000, 20, tag), 20, "{tag}");
        let quiet = Duration::from_millis(400);
        let to_peer: Vec<IpFields> = capture_peer
            .frames(quiet, 1000)
            .iter()
            .filter_map(|f| ip_fields(f))
            .filter(|f| f.dst_port == echo.addr.port())
            .collect();
        let to_client: Vec<IpFields> = capture_client
            .frames(quiet, 1000)
            .iter()
            .filter_map(|f| ip_fields(f))
            .filter(|f| f.dst_port == client_port)
            .collect();
        assert!(
            to_peer.len() >= 20 && to_client.len() >= 20,
            "{tag}: captured {} / {}",
            to_peer.len(),
            to_client.len()
        );
        (to_peer, to_client)
    };
    let kernel = seen("kernel");
    let (ok, _, stderr) = relay.ctl(&["fastpath", "off", &id]);
    assert!(ok, "{stderr}");
    let socket = seen("socket");
    let a = &relay.allocations().allocations[0];
    assert!(
        a.kernel.packets() >= 40 && a.socket.packets() >= 40,
        "{a:?}"
    );

    let expected = |dst_port| IpFields {
        ttl: 64,
        tos: 0,
        dont_fragment: !v6,
        flow_label: 0,
        dst_port,
    };
    for (path, (to_peer, to_client)) in [("kernel", kernel), ("socket", socket)] {
        for fields in to_peer {
            assert_eq!(
                fields,
                expected(echo.addr.port()),
                "{path} path, to the peer"
            );
        }
        for fields in to_client {
            assert_eq!(fields, expected(client_port), "{path} path, to the client");
        }
    }
}

#[test]
fn both_paths_write_the_same_ipv4_header() {
    both_paths_write_the_same_ip_header(false);
}

#[test]
fn both_paths_write_the_same_ipv6_header() {
    both_paths_write_the_same_ip_header(true);
}

/// `--kernel-bindings 2`: the first two channels go to the kernel, the others stay on the
/// socket path and still work; the operator hears about it once, not on every refresh.
#[test]
fn a_full_kernel_map_keeps_bindings_on_the_socket_path() {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    lab.add_static_neighbours();
    let _far = FarEnds::of(&lab);
    let relay = start_kernel_relay(&lab, false, "xdp", &["--kernel-bindings", "2"]);
    let echoes: Vec<Echo> = (0..4).map(|_| Echo::start(&lab)).collect();
    let mut client = lab_client(&lab, false);
    client.allocate();
    for round in 0..2 {
        // The second round refreshes every binding (RFC 8656 §12.2).
        for (i, echo) in echoes.iter().enumerate() {
            client.bind_channel(0x4000 + i as u16, echo.addr);
        }
        for i in 0..echoes.len() {
            let tag = format!("round {round} channel {i}");
            assert_eq!(
                round_trips(&client, 0x4000 + i as u16, 10, &tag),
                10,
                "{tag}"
            );
        }
    }
    let a = &relay.allocations().allocations[0];
    assert_eq!(
        (a.kernel.to_peer_packets, a.socket.to_peer_packets),
        (40, 40),
        "two channels in the kernel, two on the socket path: {a:?}"
    );
    let log = relay.stop();
    assert_eq!(
        log.matches("kernel channel maps full").count(),
        1,
        "one warning for the full maps:\n{log}"
    );
    assert!(log.contains("kernel maps: 2 bindings"), "{log}");
}

/// The relay on both families: listeners on the client side's IPv4 and IPv6 addresses,
/// relayed addresses on the peer side's, peers allowed in both peer subnets.
fn start_dual_stack_relay(lab: &ThreeHosts, extra: &[&str]) -> Relay {
    let relay_ns = lab.relay.name().to_owned();
    let (listen4, listen6) = (
        format!("{RELAY_CLIENT_SIDE_IP}:{PORT}"),
        format!("[{RELAY_CLIENT_SIDE_IP6}]:{PORT}"),
    );
    let mut args = vec![
        "--listen",
        listen4.as_str(),
        "--listen",
        listen6.as_str(),
        "--relay-ip",
        RELAY_PEER_SIDE_IP,
        "--relay-ip",
        RELAY_PEER_SIDE_IP6,
        "--realm",
        REALM,
        "--user",
        "alice:wonderland",
        "--allow-peer",
        "198.18.2.0/24",
        "--allow-peer",
        "2001:2:0:2::/64",
    ];
    args.extend_from_slice(extra);
    Relay::start_with(&["ip", "netns", "exec", &relay_ns], &args, 2)
}

/// A logged-in client in the client namespace, on IPv6 or IPv4, talking to the relay's
/// listener of its own family.
fn lab_client(lab: &ThreeHosts, v6: bool) -> Client {
    let (ip, server) = if v6 {
        (
            relay_tests::lab::CLIENT_IP6,
            format!("[{RELAY_CLIENT_SIDE_IP6}]:{PORT}"),
        )
    } else {
        (CLIENT_IP, format!("{RELAY_CLIENT_SIDE_IP}:{PORT}"))
    };
    let socket = lab
        .client
        .run_inside(move || UdpSocket::bind((ip, 0)).expect("client socket"));
    let mut client = Client::with_socket(socket, server.parse().expect("addr"), REALM);
    client.login("alice", "wonderland");
    client
}

/// A Send indication to `peer` and the Data indication its echo comes back as: the
/// XOR-PEER-ADDRESS names the peer in its own family whatever the client's (RFC 8656 §11).
fn send_and_data_round_trip(client: &mut Client, peer: SocketAddr, tag: &str) {
    use relay::proto::stun::{Class, Message, Method};
    client.send_indication(peer, tag.as_bytes());
    for _ in 0..4 {
        let Some(reply) = client.recv() else { break };
        let Ok(msg) = Message::decode(&reply) else {
            continue;
        };
        if (msg.class(), msg.method()) == (Class::Indication, Method::DATA)
            && msg.data() == Some(tag.as_bytes())
        {
            assert_eq!(msg.xor_peer_addresses().collect::<Vec<_>>(), vec![peer]);
            return;
        }
    }
    panic!("{tag}: no Data indication from {peer}");
}

/// RFC 6156 / RFC 8656 §7.2 relaying between families with the real binary: an IPv4 client
/// with an IPv6 relayed address reaches the IPv6 peer, an IPv6 client with an IPv4 relayed
/// address the IPv4 peer, and a dual allocation reaches both, with channels and with Send/Data
/// indications. With a fast path the kernel carries all of it, translating the IP header
/// between families (per-allocation counters tell the paths apart).
fn relays_between_families(mode: &str) {
    require_root();
    const ROUNDS: usize = 200;
    let lab = ThreeHosts::new();
    let kernel = mode != "off";
    let mut extra = vec!["--fastpath", mode];
    let (rc, rp) = (lab.relay_client_if.clone(), lab.relay_peer_if.clone());
    // Both modes: the first datagram to a neighbour not yet resolved can wait longer than the
    // client waits for an echo, which would count as a loss that is the lab's, not the relay's.
    lab.add_static_neighbours();
    let _far = kernel.then(|| {
        lab.force_forwarding_off();
        FarEnds::of(&lab)
    });
    if kernel {
        extra.extend_from_slice(&["--interface", &rc, "--interface", &rp]);
    }
    let relay = start_dual_stack_relay(&lab, &extra);
    let echo4 = Echo::start_in(&lab.peer, PEER_IP);
    let echo6 = Echo::start_in(&lab.peer, PEER_IP6);
    // Same peer IPs (so the channel's permission covers them), other ports, no channel: their
    // echoes come back as Data indications.
    let side4 = Echo::start_in(&lab.peer, PEER_IP);
    let side6 = Echo::start_in(&lab.peer, PEER_IP6);
    let allocation = |relayed: SocketAddr| {
        relay
            .allocations()
            .allocations
            .into_iter()
            .find(|a| a.relayed == relayed.to_string())
            .unwrap_or_else(|| panic!("no allocation on {relayed}"))
    };

    // IPv4 client, IPv6 relayed address, IPv6 peer.
    let mut four = lab_client(&lab, false);
    let relayed6 = four.allocate_ipv6();
    assert_eq!(relayed6.ip().to_string(), RELAY_PEER_SIDE_IP6);
    four.bind_channel(0x4000, echo6.addr);
    assert_eq!(round_trips(&four, 0x4000, ROUNDS, "4to6"), ROUNDS);
    send_and_data_round_trip(&mut four, side6.addr, "4to6 indication");
    assert_paths(&allocation(relayed6), kernel, ROUNDS as u64 + 1, &relay);

    // IPv6 client, IPv4 relayed address, IPv4 peer.
    let mut six = lab_client(&lab, true);
    let relayed4 = six.allocate_ipv4();
    assert_eq!(relayed4.ip().to_string(), RELAY_PEER_SIDE_IP);
    six.bind_channel(0x4000, echo4.addr);
    assert_eq!(round_trips(&six, 0x4000, ROUNDS, "6to4"), ROUNDS);
    send_and_data_round_trip(&mut six, side4.addr, "6to4 indication");
    assert_paths(&allocation(relayed4), kernel, ROUNDS as u64 + 1, &relay);

    // Dual allocation from an IPv4 client: one channel per family.
    let mut dual = lab_client(&lab, false);
    let relayed = dual.allocate_dual();
    let [v4, v6] = relayed.as_slice() else {
        panic!("expected two relayed addresses, got {relayed:?}");
    };
    assert_eq!(
        (v4.ip().to_string(), v6.ip().to_string()),
        (
            RELAY_PEER_SIDE_IP.to_owned(),
            RELAY_PEER_SIDE_IP6.to_owned()
        )
    );
    dual.bind_channel(0x4000, echo4.addr);
    dual.bind_channel(0x4001, echo6.addr);
    assert_eq!(round_trips(&dual, 0x4000, ROUNDS, "dual v4"), ROUNDS);
    assert_eq!(round_trips(&dual, 0x4001, ROUNDS, "dual v6"), ROUNDS);
    let a = allocation(*v4);
    assert_eq!(a.relayed_additional, Some(v6.to_string()));
    let rounds = ROUNDS as u64;
    assert_paths(&a, kernel, 2 * rounds, &relay);
    let (ok, table, stderr) = relay.ctl(&["allocations"]);
    assert!(ok, "{stderr}");
    assert!(table.contains(&format!("{v4},{v6}")), "{table}");

    // Deleting the dual allocation closes both relay sockets: nothing more reaches a peer.
    dual.delete();
    let before = (
        echo4.received.load(Ordering::Relaxed),
        echo6.received.load(Ordering::Relaxed),
    );
    assert_eq!(round_trips(&dual, 0x4000, 2, "deleted v4"), 0);
    assert_eq!(round_trips(&dual, 0x4001, 2, "deleted v6"), 0);
    assert_eq!(
        (
            echo4.received.load(Ordering::Relaxed),
            echo6.received.load(Ordering::Relaxed)
        ),
        before
    );
    assert_eq!(relay.allocations().allocations.len(), 2);
    for relayed in [v4, v6] {
        let addr = *relayed;
        let free = lab.relay.run_inside(move || UdpSocket::bind(addr).is_ok());
        assert!(free, "{addr} is still bound after the delete");
    }
}

/// Every datagram of `a` both ways (`packets` each way) went through the kernel with a fast
/// path, through the socket path without one. The kernel's count may miss the first datagram
/// each way: the one sent before the kernel entry was installed.
fn assert_paths(a: &relay::control::AllocationView, kernel: bool, packets: u64, relay: &Relay) {
    let (k, s) = (&a.kernel, &a.socket);
    if kernel {
        assert_eq!(a.path, "kernel");
        assert_eq!(
            (
                k.to_peer_packets + s.to_peer_packets,
                k.to_client_packets + s.to_client_packets
            ),
            (packets, packets),
            "{a:?}"
        );
        assert!(
            k.to_peer_packets + 2 >= packets && k.to_client_packets + 2 >= packets,
            "the kernel carries the allocation, across families too: {a:?}\n{}",
            relay.log()
        );
    } else {
        assert_eq!(k.packets(), 0);
        assert_eq!((s.to_peer_packets, s.to_client_packets), (packets, packets));
    }
}

#[test]
fn relays_between_families_on_the_socket_path() {
    relays_between_families("off");
}

#[test]
fn relays_between_families_with_the_xdp_fast_path() {
    relays_between_families("xdp");
}

/// coturn's client with Send/Data indications (`-s`, no channels) through the kernel fast
/// path: zero loss both ways, the kernel carries (almost) every indication.
fn indications_through_the_kernel(mode: &str, v6: bool) {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    let _far = FarEnds::of(&lab);
    let relay = start_kernel_relay(&lab, v6, mode, &[]);
    let server = if v6 {
        RELAY_CLIENT_SIDE_IP6
    } else {
        RELAY_CLIENT_SIDE_IP
    };
    uclient_with(&lab, &relay, v6, server, &["-s"]);
    let metric = |path: &str, direction: &str| {
        relay.metric(&format!(
            "relay_relayed_packets_total{{path=\"{path}\",direction=\"{direction}\"}}"
        ))
    };
    let (kernel_up, kernel_down) = (metric("kernel", "to_peer"), metric("kernel", "to_client"));
    let (socket_up, socket_down) = (metric("socket", "to_peer"), metric("socket", "to_client"));
    assert_eq!(kernel_up + socket_up, 1000, "{}", relay.log());
    assert_eq!(kernel_down + socket_down, 1000, "{}", relay.log());
    let log = relay.stop();
    assert!(
        socket_up <= 10 && socket_down <= 10,
        "socket path carried {socket_up} up, {socket_down} down\n{log}"
    );
    assert!(log.contains("forward_send_to_peer="), "{log}");
    assert!(log.contains("forward_data_to_client="), "{log}");
}

#[test]
fn send_and_data_indications_through_the_xdp_fast_path() {
    indications_through_the_kernel("xdp", false);
}

#[test]
fn send_and_data_indications_through_the_xdp_fast_path_ipv6() {
    indications_through_the_kernel("xdp", true);
}

#[test]
fn send_and_data_indications_through_the_tc_fast_path() {
    indications_through_the_kernel("tc", false);
}

/// Sends `count` Send indications to `peer` one at a time and waits for each echo as a Data
/// indication; returns how many came back.
fn indication_round_trips(client: &mut Client, peer: SocketAddr, count: usize, tag: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut echoed = 0;
    for i in 0..count {
        assert!(
            Instant::now() < deadline,
            "{tag}: round trips took too long"
        );
        // A multiple of four bytes: a Data indication then needs no padding, which the kernel
        // could only append where the driver leaves tailroom (veth does not always).
        let mut data = format!("{tag} indication {i:05}");
        while data.len() % 4 != 0 {
            data.push('.');
        }
        client.send_indication(peer, data.as_bytes());
        if let Some(reply) = client.recv() {
            if reply.windows(data.len()).any(|w| w == data.as_bytes()) {
                echoed += 1;
            }
        }
    }
    echoed
}

/// A permission that expires, or an allocation deleted, takes Send and Data indications out of
/// the kernel: nothing is forwarded past it, on either path (real traffic).
#[test]
fn expired_permissions_stop_kernel_indications() {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    lab.add_static_neighbours();
    let _far = FarEnds::of(&lab);
    let echo = Echo::start(&lab);
    let relay = start_kernel_relay(&lab, false, "xdp", &["--permission-lifetime", "2"]);
    let mut client = lab_client(&lab, false);
    client.allocate();
    use relay::proto::stun::{Attribute, Method};
    assert_eq!(
        client.request_error(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(echo.addr)]
        ),
        None
    );
    assert_eq!(
        indication_round_trips(&mut client, echo.addr, 20, "live"),
        20
    );
    let a = &relay.allocations().allocations[0];
    assert_eq!(
        (a.kernel.to_peer_packets, a.kernel.to_client_packets),
        (20, 20),
        "the kernel carries both directions: {a:?}"
    );

    std::thread::sleep(Duration::from_millis(2500));
    let before = echo.received.load(Ordering::Relaxed);
    assert_eq!(
        indication_round_trips(&mut client, echo.addr, 10, "expired"),
        0
    );
    assert_eq!(echo.received.load(Ordering::Relaxed), before);
    let a = &relay.allocations().allocations[0];
    assert_eq!(
        (a.kernel.to_peer_packets, a.socket.to_peer_packets),
        (20, 0),
        "nothing forwarded after expiry: {a:?}"
    );

    // Deleting an allocation takes its indications out of the kernel at once.
    let mut other = lab_client(&lab, false);
    other.allocate();
    assert_eq!(
        other.request_error(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(echo.addr)]
        ),
        None
    );
    assert_eq!(indication_round_trips(&mut other, echo.addr, 5, "other"), 5);
    other.delete();
    let before = echo.received.load(Ordering::Relaxed);
    assert_eq!(
        indication_round_trips(&mut other, echo.addr, 5, "deleted"),
        0
    );
    assert_eq!(
        echo.received.load(Ordering::Relaxed),
        before,
        "nothing forwarded after the delete"
    );
}

/// The id of the XDP program attached to `interface` in `ns`, if any (`ip -d -j link`).
fn xdp_program_id(ns: &relay_tests::Netns, interface: &str) -> Option<u64> {
    xdp_program_id_in(ns.name(), interface)
}

/// [`xdp_program_id`] by namespace name.
fn xdp_program_id_in(ns: &str, interface: &str) -> Option<u64> {
    let out = relay_tests::run(
        "ip",
        &["-n", ns, "-d", "-j", "link", "show", "dev", interface],
    );
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    links[0]["xdp"]["prog"]["id"].as_u64()
}

/// `kill -9` leaves nothing forwarding and a restart attaches cleanly: programs attached
/// through BPF links go with the process; one attached through netlink (as kernels before 5.9
/// attach XDP, or `ip link` does) survives it and is replaced by the next relay, which then
/// carries traffic.
#[test]
fn a_killed_relay_leaves_nothing_attached_and_a_restart_replaces_a_stale_program() {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    lab.add_static_neighbours();
    let _far = FarEnds::of(&lab);
    let echo = Echo::start(&lab);
    let rc = lab.relay_client_if.clone();

    let relay = start_kernel_relay(&lab, false, "xdp", &[]);
    assert!(xdp_program_id(&lab.relay, &rc).is_some(), "attached");
    relay.kill9();
    assert_eq!(
        xdp_program_id(&lab.relay, &rc),
        None,
        "the link went with the process"
    );

    // A relay_xdp attached through netlink, left behind by a relay killed with -9.
    let relay = start_kernel_relay(&lab, false, "xdp", &[]);
    let stale = xdp_program_id(&lab.relay, &rc).expect("attached");
    // Pinned in a bpffs of the test's own (`ip netns exec` mounts its own /sys, hiding
    // /sys/fs/bpf), so `ip link` can attach it through netlink once the relay is gone.
    let bpffs = BpfFs::mount(&format!("stale-{}-{stale}", lab.relay.name()));
    let pin = bpffs.path("relay_xdp");
    relay_tests::run("bpftool", &["prog", "pin", "id", &stale.to_string(), &pin]);
    relay.kill9();
    lab.relay
        .ip(&["link", "set", "dev", &rc, "xdpgeneric", "pinned", &pin]);
    drop(bpffs);
    assert_eq!(xdp_program_id(&lab.relay, &rc), Some(stale));

    let relay = start_kernel_relay(&lab, false, "xdp", &[]);
    let fresh = xdp_program_id(&lab.relay, &rc).expect("attached");
    assert_ne!(
        fresh,
        stale,
        "the stale program was replaced:\n{}",
        relay.log()
    );
    assert!(
        relay.log().contains("replaced a stale relay_xdp"),
        "{}",
        relay.log()
    );
    let mut client = lab_client(&lab, false);
    client.allocate();
    client.bind_channel(0x4000, echo.addr);
    assert_eq!(round_trips(&client, 0x4000, 20, "after restart"), 20);
    let a = &relay.allocations().allocations[0];
    assert_eq!(
        a.kernel.to_peer_packets, 20,
        "the new program forwards: {a:?}"
    );

    // A second relay on the same interface while this one runs: refused, nothing detached.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", lab.relay.name()])
        .arg(relay_tests::relay_bin())
        .args([
            "serve",
            "--listen",
            &format!("{RELAY_CLIENT_SIDE_IP}:{PORT}"),
            "--relay-ip",
            RELAY_PEER_SIDE_IP,
            "--admin",
            "127.0.0.1:0",
            "--fastpath",
            "xdp",
            "--interface",
            &rc,
        ])
        .output()
        .expect("run a second relay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("another running relay uses"), "{stderr}");
    assert_eq!(
        xdp_program_id(&lab.relay, &rc),
        Some(fresh),
        "still the running relay's"
    );
    assert_eq!(round_trips(&client, 0x4000, 5, "still forwarding"), 5);
}

/// A bpffs mounted on a fresh directory under /tmp, unmounted and removed on drop.
struct BpfFs(std::path::PathBuf);

impl BpfFs {
    fn mount(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("relay-test-bpffs-{tag}"));
        std::fs::create_dir_all(&dir).expect("bpffs mount point");
        let path = dir.to_str().expect("UTF-8 path").to_owned();
        relay_tests::run("mount", &["-t", "bpf", "bpf", &path]);
        Self(dir)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().expect("UTF-8 path").to_owned()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let path = self.0.to_str().unwrap_or_default().to_owned();
        let _ = std::process::Command::new("umount").arg(&path).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Once started (programs attached, listeners bound), the relay runs as `nobody` with only
/// CAP_NET_ADMIN (neighbour resolution for next hops), the bounding set cut to it and
/// `no_new_privs`, and both paths keep working (issue 12: the STUN parser must not run as
/// root).
#[test]
fn the_relay_drops_root_after_its_privileged_start() {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    lab.add_static_neighbours();
    let _far = FarEnds::of(&lab);
    let echo = Echo::start(&lab);
    let relay = start_kernel_relay(&lab, false, "xdp", &[]);
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", relay.pid())).expect("relay status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(|value| value.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("no {name} in\n{status}"))
    };
    assert_eq!(field("Uid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(field("Gid:"), "65534 65534 65534 65534", "{status}");
    // CAP_NET_ADMIN (12) only: effective, permitted and bounding sets.
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(field(set), "0000000000001000", "{set}\n{status}");
    }
    assert_eq!(field("NoNewPrivs:"), "1");
    assert!(relay.log().contains("dropped root"), "{}", relay.log());

    let mut client = lab_client(&lab, false);
    client.allocate();
    client.bind_channel(0x4000, echo.addr);
    assert_eq!(round_trips(&client, 0x4000, 20, "unprivileged"), 20);
    let a = &relay.allocations().allocations[0];
    assert_eq!(
        a.kernel.to_peer_packets, 20,
        "kernel entries installed: {a:?}"
    );
    // Map updates after the drop: the allocation moves to the socket path and back.
    let id = a.id.to_string();
    for (state, path) in [("off", "socket"), ("on", "kernel")] {
        let (ok, _, stderr) = relay.ctl(&["fastpath", state, &id]);
        assert!(ok, "fastpath {state}: {stderr}");
        assert_eq!(relay.allocations().allocations[0].path, path);
    }
    assert_eq!(round_trips(&client, 0x4000, 5, "back in the kernel"), 5);
}

/// systemd readiness (sd_notify): READY=1 arrives only once the listener is bound and the fast
/// path attached; WATCHDOG=1 follows at half of WATCHDOG_USEC while every worker lives;
/// STOPPING=1 on SIGTERM. The notify socket is the test's own (PID 1 here is not systemd).
#[test]
fn systemd_readiness_watchdog_and_stopping_reach_the_notify_socket() {
    use std::os::unix::{fs::PermissionsExt, net::UnixDatagram};
    require_root();
    let lab = ThreeHosts::new();
    lab.add_static_neighbours();
    let dir = std::env::temp_dir().join(format!("relay-test-notify-{}", lab.relay.name()));
    std::fs::create_dir_all(&dir).expect("notify directory");
    let path = dir.join("notify");
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).expect("notify socket");
    // The relay sends after it dropped root.
    for p in [&dir, &path] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let (rc, rp) = (lab.relay_client_if.clone(), lab.relay_peer_if.clone());
    let ns = lab.relay.name().to_owned();
    let listen = format!("{RELAY_CLIENT_SIDE_IP}:{PORT}");
    let notify_env = format!("NOTIFY_SOCKET={}", path.display());
    // What is up at the moment READY=1 arrives, read on another thread while the relay starts.
    let reader = std::thread::spawn({
        let socket = socket.try_clone().expect("clone");
        let (rc, rp, ns) = (rc.clone(), rp.clone(), ns.clone());
        move || {
            let mut buffer = [0u8; 512];
            let len = socket.recv(&mut buffer).expect("a notification");
            let first = String::from_utf8_lossy(&buffer[..len]).into_owned();
            let attached = [&rc, &rp].map(|dev| xdp_program_id_in(&ns, dev).is_some());
            let bound = relay_tests::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    &ns,
                    "ss",
                    "-H",
                    "-uln",
                    &format!("sport = :{PORT}"),
                ],
            );
            (first, attached, !bound.stdout.is_empty())
        }
    });
    let relay = start_relay_with_env(
        &lab,
        false,
        &[&listen],
        &["--fastpath", "xdp", "--interface", &rc, "--interface", &rp],
        &[&notify_env, "WATCHDOG_USEC=200000"],
    );
    let (first, attached, bound) = reader.join().expect("reader");
    assert!(first.starts_with("READY=1\n"), "{first:?}");
    assert_eq!(attached, [true, true], "fast path attached before READY=1");
    assert!(bound, "listener bound before READY=1");

    // Pings every 100 ms.
    let mut watchdogs = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buffer = [0u8; 512];
    while Instant::now() < deadline && watchdogs < 5 {
        let len = socket.recv(&mut buffer).expect("a notification");
        if &buffer[..len] == b"WATCHDOG=1" {
            watchdogs += 1;
        }
    }
    assert_eq!(watchdogs, 5, "{}", relay.log());

    relay.stop();
    let mut stopping = false;
    while let Ok(len) = socket.recv(&mut buffer) {
        if &buffer[..len] == b"STOPPING=1" {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    let _ = std::fs::remove_dir_all(&dir);
}
