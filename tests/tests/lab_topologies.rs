//! `relay serve` with the kernel fast path in the topologies and events an operator's host
//! sees beyond the three-namespace lab: a single interface carrying both the listener and the
//! relayed address (frames leave through the interface they came in on), a peer whose MAC
//! address changes mid-flow, and a route to the peer that moves to an interface the fast path
//! is not attached to and back, mid-flow.
//!
//! Neighbours are learnt dynamically (ARP/ND) everywhere, and IP forwarding is off in the
//! relay namespace: the client can only reach the peer through the relay.

mod support;

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use relay_tests::{
    fastpath::FarEnds,
    lab::{
        force_forwarding_off, OneNic, ThreeHosts, CLIENT_IP, ONE_NIC_PEER_IP, ONE_NIC_PEER_IP6,
        ONE_NIC_PEER_NET, ONE_NIC_PEER_NET6, ONE_NIC_RELAY_IP, ONE_NIC_RELAY_IP6, PEER_IP,
        RELAY_CLIENT_SIDE_IP, RELAY_CLIENT_SIDE_IP6, RELAY_PEER_SIDE_IP,
    },
    require_root, unique_suffix, Netns,
};
use support::{
    client::Client,
    echo::{round_trip, round_trips, Echo},
    Relay,
};

const REALM: &str = "lab.test";
const PORT: &str = "3478";
/// The channel the hand-driven flows use.
const CHANNEL: u16 = 0x4000;

/// `relay serve` in `ns`, listening on `listen`, relaying from `relay_ip` to `peers`.
fn start_relay(ns: &Netns, listen: &str, relay_ip: &str, peers: &str, extra: &[&str]) -> Relay {
    let mut args = vec![
        "--listen",
        listen,
        "--relay-ip",
        relay_ip,
        "--realm",
        REALM,
        "--user",
        "alice:wonderland",
        "--allow-peer",
        peers,
        "--legacy-channels",
    ];
    args.extend_from_slice(extra);
    Relay::start_with(&["ip", "netns", "exec", ns.name()], &args, 1)
}

/// The relay's packet counters and the kernel verdicts that matter here, at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    kernel_up: u64,
    kernel_down: u64,
    socket_up: u64,
    socket_down: u64,
    no_next_hop: u64,
    egress_not_attached: u64,
    rewrite_failed: u64,
}

impl Counts {
    /// One `relay ctl metrics` read.
    fn read(relay: &Relay) -> Self {
        let (ok, stdout, stderr) = relay.ctl(&["metrics"]);
        assert!(ok, "relay ctl metrics: {stderr}");
        let samples: HashMap<&str, u64> = stdout
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (name, value) = line.rsplit_once(' ')?;
                Some((name, value.parse().ok()?))
            })
            .collect();
        let get = |name: String| {
            samples
                .get(name.as_str())
                .copied()
                .unwrap_or_else(|| panic!("no metric {name} in:\n{stdout}"))
        };
        let packets = |path: &str, direction: &str| {
            get(format!(
                "relay_relayed_packets_total{{path=\"{path}\",direction=\"{direction}\"}}"
            ))
        };
        let verdict = |reason: &str| {
            get(format!(
                "relay_fastpath_verdicts_total{{reason=\"{reason}\"}}"
            ))
        };
        Self {
            kernel_up: packets("kernel", "to_peer"),
            kernel_down: packets("kernel", "to_client"),
            socket_up: packets("socket", "to_peer"),
            socket_down: packets("socket", "to_client"),
            no_next_hop: verdict("pass_no_next_hop"),
            egress_not_attached: verdict("pass_egress_not_attached"),
            rewrite_failed: verdict("drop_rewrite_failed"),
        }
    }

    /// What happened between `earlier` and this reading.
    fn since(self, earlier: Self) -> Self {
        Self {
            kernel_up: self.kernel_up - earlier.kernel_up,
            kernel_down: self.kernel_down - earlier.kernel_down,
            socket_up: self.socket_up - earlier.socket_up,
            socket_down: self.socket_down - earlier.socket_down,
            no_next_hop: self.no_next_hop - earlier.no_next_hop,
            egress_not_attached: self.egress_not_attached - earlier.egress_not_attached,
            rewrite_failed: self.rewrite_failed - earlier.rewrite_failed,
        }
    }
}

/// Checksum errors the client and the peer counted (the kernel path rewrites checksums
/// incrementally; a mistake shows up here).
fn checksum_errors(ns: &Netns, v6: bool) -> u64 {
    if v6 {
        ns.snmp6_counter("Udp6InCsumErrors")
    } else {
        ns.udp_counter("InCsumErrors")
    }
}

/// coturn's client (4 allocations × 250 ChannelData datagrams of 200 bytes, each echoed by
/// coturn's peer), the relay on the one interface of [`OneNic`] with the fast path in `mode`:
/// zero loss, and the kernel carries (almost) everything, out of the interface it came in on.
fn one_nic_uclient(mode: &str, v6: bool) {
    require_root();
    let lab = OneNic::new();
    lab.force_forwarding_off();
    assert!(
        !lab.client_reaches_peer(),
        "client and peer must not share a route"
    );
    let _far = FarEnds::attach(&[(&lab.switch, &lab.switch_relay_if)]);
    let (listen, server, relay_ip, peer_ip, peers) = if v6 {
        (
            format!("[{RELAY_CLIENT_SIDE_IP6}]:{PORT}"),
            RELAY_CLIENT_SIDE_IP6,
            ONE_NIC_RELAY_IP6,
            ONE_NIC_PEER_IP6,
            ONE_NIC_PEER_NET6,
        )
    } else {
        (
            format!("{RELAY_CLIENT_SIDE_IP}:{PORT}"),
            RELAY_CLIENT_SIDE_IP,
            ONE_NIC_RELAY_IP,
            ONE_NIC_PEER_IP,
            ONE_NIC_PEER_NET,
        )
    };
    let relay = start_relay(
        &lab.relay,
        &listen,
        relay_ip,
        peers,
        &["--fastpath", mode, "--interface", &lab.relay_if],
    );
    support::uclient_echo(
        &relay,
        (lab.client.name(), lab.peer.name()),
        (peer_ip, server),
        v6,
        &[],
    );

    let counts = Counts::read(&relay);
    assert_eq!(counts.kernel_up + counts.socket_up, 1000, "{counts:?}");
    assert_eq!(counts.kernel_down + counts.socket_down, 1000, "{counts:?}");
    // The sockets see at most the first datagrams of each direction, while the relay's
    // neighbour entries for the client and the peer are being resolved.
    assert!(
        counts.socket_up <= 10 && counts.socket_down <= 10,
        "{counts:?}\n{}",
        relay.log()
    );
    // Those are also the only datagrams without a usable next hop; nothing was dropped, and
    // with one interface nothing can want another one.
    assert!(counts.no_next_hop <= 20, "{counts:?}");
    assert_eq!(counts.egress_not_attached, 0, "{counts:?}");
    assert_eq!(counts.rewrite_failed, 0, "{counts:?}");
    for ns in [&lab.client, &lab.peer] {
        assert_eq!(
            checksum_errors(ns, v6),
            0,
            "checksum errors in {}",
            ns.name()
        );
    }
    let log = relay.stop();
    assert!(log.contains("fast path detached"), "{log}");
}

#[test]
fn one_nic_xdp_carries_uclient_traffic() {
    one_nic_uclient("xdp", false);
}

#[test]
fn one_nic_xdp_carries_uclient_traffic_ipv6() {
    one_nic_uclient("xdp", true);
}

#[test]
fn one_nic_tc_carries_uclient_traffic() {
    one_nic_uclient("tc", false);
}

/// A steady flow of ChannelData round trips on a thread of its own, one every
/// [`Flow::PACE`], so the test can change the network under it.
struct Flow {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    echoed: Arc<AtomicU64>,
    thread: Option<JoinHandle<Client>>,
}

impl Flow {
    const PACE: Duration = Duration::from_millis(2);
    /// A flow never runs longer than this, whatever the test does.
    const LIMIT: Duration = Duration::from_secs(30);

    fn start(client: Client, channel: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let echoed = Arc::new(AtomicU64::new(0));
        let (done, sent_count, echo_count) =
            (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&echoed));
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Self::LIMIT;
            let mut i = 0u64;
            while !done.load(Ordering::Relaxed) && Instant::now() < deadline {
                sent_count.fetch_add(1, Ordering::Relaxed);
                if round_trip(&client, channel, &format!("flow {i:08}")) {
                    echo_count.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                std::thread::sleep(Self::PACE);
            }
            client
        });
        Self {
            stop,
            sent,
            echoed,
            thread: Some(thread),
        }
    }

    /// Stops after the round trip in progress; returns (sent, echoed).
    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.echoed.load(Ordering::Relaxed),
        )
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The three-namespace lab with the relay on XDP on both its interfaces, forwarding off,
/// dynamic neighbours, an echo server on the peer and a client with channel [`CHANNEL`]
/// bound to it, warmed up until both next hops are resolved.
struct Running {
    relay: Relay,
    echo: Echo,
    client: Client,
    _far: FarEnds,
}

fn three_hosts_running(lab: &ThreeHosts, extra_forwarding_off: &[&str]) -> Running {
    let mut devs = vec![lab.relay_client_if.as_str(), lab.relay_peer_if.as_str()];
    devs.extend_from_slice(extra_forwarding_off);
    force_forwarding_off(&lab.relay, &devs);
    let far = FarEnds::of(lab);
    let relay = start_relay(
        &lab.relay,
        &format!("{RELAY_CLIENT_SIDE_IP}:{PORT}"),
        RELAY_PEER_SIDE_IP,
        "198.18.2.0/24",
        &[
            "--fastpath",
            "xdp",
            "--interface",
            &lab.relay_client_if,
            "--interface",
            &lab.relay_peer_if,
        ],
    );
    let echo = Echo::start_in(&lab.peer, PEER_IP);
    let server: SocketAddr = format!("{RELAY_CLIENT_SIDE_IP}:{PORT}")
        .parse()
        .expect("addr");
    let socket = lab
        .client
        .run_inside(|| UdpSocket::bind((CLIENT_IP, 0)).expect("client socket"));
    let mut client = Client::with_socket(socket, server, REALM);
    client.login("alice", "wonderland");
    client.allocate();
    client.bind_channel(CHANNEL, echo.addr);
    // The first datagrams resolve the neighbours through the socket path.
    assert_eq!(round_trips(&client, CHANNEL, 50, "warm-up"), 50);
    let warm = Counts::read(&relay);
    assert!(
        warm.kernel_up >= 40,
        "still not on the kernel path: {warm:?}"
    );
    Running {
        relay,
        echo,
        client,
        _far: far,
    }
}

/// Polls `check` every 20 ms until it holds or `limit` passes; returns whether it held.
fn wait_for(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The peer's new MAC address in [`peer_mac_changes_mid_flow`].
const NEW_PEER_MAC: &str = "02:00:00:00:02:99";

/// The peer's MAC address changes while a flow runs through the XDP path (a replaced NIC, a
/// failover). The peer announces it the way hosts do, with a gratuitous ARP (Linux sends one
/// on an address change when `arp_notify` is on); the relay's neighbour entry takes the new
/// MAC, netlink reports it, and the next hop is rewritten: the flow keeps going on the kernel
/// path, to the new MAC.
#[test]
fn peer_mac_changes_mid_flow() {
    require_root();
    let lab = ThreeHosts::new();
    lab.peer.exec(
        "sysctl",
        &[
            "-qw",
            &format!("net.ipv4.conf.{}.arp_notify=1", lab.peer_if),
        ],
    );
    let Running {
        relay,
        echo: _echo,
        client,
        _far,
    } = three_hosts_running(&lab, &[]);
    let relay_neighbour = || {
        let out = lab
            .relay
            .ip(&["neigh", "show", PEER_IP, "dev", &lab.relay_peer_if]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!relay_neighbour().contains(NEW_PEER_MAC));

    let flow = Flow::start(client, CHANNEL);
    std::thread::sleep(Duration::from_millis(500));
    let before = Counts::read(&relay);
    lab.peer
        .ip(&["link", "set", "dev", &lab.peer_if, "address", NEW_PEER_MAC]);
    // Within 3 s only the announcement can teach it: nothing on the relay uses the entry (the
    // kernel path bypasses the stack, and its own re-confirmation runs every 15 s).
    assert!(
        wait_for(Duration::from_secs(3), || relay_neighbour()
            .contains(NEW_PEER_MAC)),
        "the relay did not learn the new MAC: {}",
        relay_neighbour()
    );
    // Give the netlink thread time to rewrite the next hop, then watch the flow.
    std::thread::sleep(Duration::from_millis(200));
    let changed = Counts::read(&relay);
    std::thread::sleep(Duration::from_millis(1000));
    let after = Counts::read(&relay);
    let (sent, echoed) = flow.stop();

    let during = changed.since(before);
    let afterwards = after.since(changed);
    let context = format!(
        "sent {sent}, echoed {echoed}; during the change {during:?}; afterwards \
         {afterwards:?}\n{}",
        relay.log()
    );
    eprintln!(
        "sent {sent}, echoed {echoed}; during the change {during:?}; afterwards {afterwards:?}"
    );
    // Only the datagrams the kernel sent to the old MAC between the change and the
    // gratuitous ARP can be lost: one round trip at a time is in flight.
    assert!(sent - echoed <= 1, "{context}");
    // After the change the kernel keeps carrying the flow, both ways, and the sockets see
    // nothing: the next hop was rewritten, not invalidated.
    assert!(
        afterwards.kernel_up >= 50 && afterwards.kernel_down >= 50,
        "{context}"
    );
    assert_eq!(
        (
            afterwards.socket_up,
            afterwards.socket_down,
            afterwards.no_next_hop
        ),
        (0, 0, 0),
        "{context}"
    );
    assert_eq!(after.rewrite_failed, 0, "{context}");
}

/// Reads `/sys/class/net/DEV/statistics/NAME` inside `ns`.
fn link_counter(ns: &Netns, dev: &str, name: &str) -> u64 {
    let out = ns.exec("cat", &[&format!("/sys/class/net/{dev}/statistics/{name}")]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric link counter")
}

/// The relay's route to the peer moves, mid-flow, to a second link between relay and peer
/// that the fast path is not attached to, and back. While it is there the kernel cannot send
/// to the peer: it marks the next hop invalid and passes the client's datagrams to the relay
/// socket, which delivers them over the second link; the peer's answers still arrive on the
/// attached link and stay on the kernel path. When the route comes back, so does the kernel.
/// Nothing is lost.
#[test]
fn peer_route_moves_off_and_back_onto_the_fast_path_mid_flow() {
    require_root();
    let lab = ThreeHosts::new();
    let suffix = unique_suffix();
    let (relay_alt, peer_alt) = (format!("ra{suffix}"), format!("pa{suffix}"));
    lab.peer.ip(&[
        "link", "add", &peer_alt, "type", "veth", "peer", "name", &relay_alt,
    ]);
    lab.peer
        .ip(&["link", "set", &relay_alt, "netns", lab.relay.name()]);
    lab.peer.ip(&["link", "set", &peer_alt, "up"]);
    lab.relay.ip(&["link", "set", &relay_alt, "up"]);
    // The peer accepts the relay's datagrams on the second link although its route back to
    // the relay uses the first (no reverse-path filter: a multihomed host).
    for key in ["all", peer_alt.as_str()] {
        lab.peer.exec(
            "sysctl",
            &["-qw", &format!("net.ipv4.conf.{key}.rp_filter=0")],
        );
    }
    let Running {
        relay,
        echo: _echo,
        client,
        _far,
    } = three_hosts_running(&lab, &[&relay_alt]);
    let host_route = format!("{PEER_IP}/32");

    let flow = Flow::start(client, CHANNEL);
    // Phase 1: the kernel carries both ways.
    std::thread::sleep(Duration::from_millis(300));
    let start = Counts::read(&relay);
    std::thread::sleep(Duration::from_millis(700));
    let attached = Counts::read(&relay);

    // Phase 2: a more specific route sends the peer's traffic out of the second link.
    let alt_sent_before = link_counter(&lab.relay, &relay_alt, "tx_packets");
    lab.relay
        .ip(&["route", "add", &host_route, "dev", &relay_alt]);
    std::thread::sleep(Duration::from_millis(300));
    let moved = Counts::read(&relay);
    std::thread::sleep(Duration::from_millis(700));
    let detached = Counts::read(&relay);
    let alt_sent = link_counter(&lab.relay, &relay_alt, "tx_packets") - alt_sent_before;

    // Phase 3: the route goes away, the connected route over the attached link is back.
    lab.relay
        .ip(&["route", "del", &host_route, "dev", &relay_alt]);
    std::thread::sleep(Duration::from_millis(300));
    let back = Counts::read(&relay);
    std::thread::sleep(Duration::from_millis(700));
    let end = Counts::read(&relay);
    let (sent, echoed) = flow.stop();

    let phase1 = attached.since(start);
    let phase2 = detached.since(moved);
    let phase3 = end.since(back);
    let context = format!(
        "sent {sent}, echoed {echoed}\nattached {phase1:?}\nmoved {phase2:?}\nback \
         {phase3:?}\nsecond link sent {alt_sent}\n{}",
        relay.log()
    );
    eprintln!(
        "sent {sent}, echoed {echoed}\nattached {phase1:?}\nmoved {phase2:?}\nback {phase3:?}"
    );
    assert_eq!(sent, echoed, "{context}");
    // 1: everything on the kernel path.
    assert!(
        phase1.kernel_up >= 50 && phase1.kernel_down >= 50,
        "{context}"
    );
    assert_eq!((phase1.socket_up, phase1.socket_down), (0, 0), "{context}");
    // 2: towards the peer on the socket path, out of the second link, because the kernel has
    // no next hop; the answers still on the kernel path.
    assert_eq!(phase2.kernel_up, 0, "{context}");
    assert!(phase2.socket_up >= 50, "{context}");
    // Every one of them passed for want of a next hop (the two counters are read a moment
    // apart, so one datagram may sit between them).
    assert!(
        phase2.no_next_hop.abs_diff(phase2.socket_up) <= 1,
        "{context}"
    );
    assert!(alt_sent >= phase2.socket_up, "{context}");
    assert!(phase2.kernel_down >= 50, "{context}");
    assert_eq!(phase2.socket_down, 0, "{context}");
    // 3: everything on the kernel path again.
    assert!(
        phase3.kernel_up >= 50 && phase3.kernel_down >= 50,
        "{context}"
    );
    assert_eq!((phase3.socket_up, phase3.socket_down), (0, 0), "{context}");
    assert_eq!(end.rewrite_failed, 0, "{context}");
}
