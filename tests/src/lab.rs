//! Lab topologies from shared/docs/test-lab.md.

use crate::{unique_suffix, Netns};

/// Two hosts on one veth pair: `client` (198.18.1.2/24 on `client_if`) and `relay`
/// (198.18.1.1/24 on `relay_if`).
pub struct TwoHosts {
    pub client: Netns,
    pub relay: Netns,
    pub client_if: String,
    pub relay_if: String,
}

pub const CLIENT_IP: &str = "198.18.1.2";
pub const RELAY_CLIENT_SIDE_IP: &str = "198.18.1.1";

impl TwoHosts {
    pub fn new() -> Self {
        let client = Netns::new("rtc");
        let relay = Netns::new("rtr");
        let suffix = unique_suffix();
        let client_if = format!("c{suffix}");
        let relay_if = format!("r{suffix}");
        assert!(relay_if.len() <= 15, "interface name too long: {relay_if}");
        // Create both ends inside the client namespace, then move one: no device ever sits in
        // the test runner's own namespace.
        client.ip(&[
            "link", "add", &client_if, "type", "veth", "peer", "name", &relay_if,
        ]);
        client.ip(&["link", "set", &relay_if, "netns", relay.name()]);
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", &client_if]);
        relay.ip(&[
            "addr",
            "add",
            &format!("{RELAY_CLIENT_SIDE_IP}/24"),
            "dev",
            &relay_if,
        ]);
        client.ip(&["link", "set", &client_if, "up"]);
        relay.ip(&["link", "set", &relay_if, "up"]);
        Self {
            client,
            relay,
            client_if,
            relay_if,
        }
    }
}

impl Default for TwoHosts {
    fn default() -> Self {
        Self::new()
    }
}

/// Relay's address on the peer side (relayed transport addresses live here).
pub const RELAY_PEER_SIDE_IP: &str = "198.18.2.1";
/// The peer host.
pub const PEER_IP: &str = "198.18.2.2";
/// IPv6 addresses of the same hosts, from the benchmark range 2001:2::/48 (RFC 5180), /64 each.
pub const CLIENT_IP6: &str = "2001:2:0:1::2";
pub const RELAY_CLIENT_SIDE_IP6: &str = "2001:2:0:1::1";
pub const RELAY_PEER_SIDE_IP6: &str = "2001:2:0:2::1";
pub const PEER_IP6: &str = "2001:2:0:2::2";

/// Fixed, locally administered MAC addresses, so packet fixtures can spell out Ethernet headers.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x01, 0x02];
pub const RELAY_CLIENT_SIDE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x01, 0x01];
pub const RELAY_PEER_SIDE_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x02, 0x01];
pub const PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x02, 0x02];

/// The three-namespace lab of test-lab.md:
///
/// ```text
///  client ns                         relay ns                                peer ns
///  client_if 198.18.1.2/24 <-veth-> relay_client_if 198.18.1.1/24
///            2001:2:0:1::2/64                       2001:2:0:1::1/64
///                                   relay_peer_if   198.18.2.1/24 <-veth-> peer_if 198.18.2.2/24
///                                                   2001:2:0:2::1/64               2001:2:0:2::2/64
/// ```
///
/// - Every device has a fixed MAC (the `*_MAC` constants) and IPv6 addresses without DAD, so
///   they are usable at once.
/// - Client and peer have no routes beyond their own /24 and /64: they can only talk to each
///   other through the relay (a test can prove that with [`ThreeHosts::client_reaches_peer`]).
/// - TX checksum offload is off on `client_if` and `peer_if`: a local sender on a veth
///   otherwise puts partial checksums on frames, which the kernel fast path (incremental
///   checksum updates) cannot repair; real NICs deliver complete ones.
/// - IP forwarding stays off in every namespace ([`ThreeHosts::force_forwarding_off`] makes it
///   explicit): the kernel fast path resolves next hops in userspace and needs no router
///   sysctl. [`ThreeHosts::add_static_neighbours`] lets it forward from the first frame (it
///   passes frames to the stack while a neighbour is unresolved).
///
/// Dropping it deletes the namespaces and with them every device.
pub struct ThreeHosts {
    pub client: Netns,
    pub relay: Netns,
    pub peer: Netns,
    pub client_if: String,
    pub relay_client_if: String,
    pub relay_peer_if: String,
    pub peer_if: String,
}

impl ThreeHosts {
    pub fn new() -> Self {
        let client = Netns::new("l3c");
        let relay = Netns::new("l3r");
        let peer = Netns::new("l3p");
        let suffix = unique_suffix();
        let lab = Self {
            client_if: format!("c{suffix}"),
            relay_client_if: format!("rc{suffix}"),
            relay_peer_if: format!("rp{suffix}"),
            peer_if: format!("p{suffix}"),
            client,
            relay,
            peer,
        };
        assert!(
            lab.relay_client_if.len() <= 15,
            "interface name too long: {}",
            lab.relay_client_if
        );
        veth(
            (&lab.client, &lab.client_if, CLIENT_MAC),
            (&lab.relay, &lab.relay_client_if, RELAY_CLIENT_SIDE_MAC),
        );
        veth(
            (&lab.peer, &lab.peer_if, PEER_MAC),
            (&lab.relay, &lab.relay_peer_if, RELAY_PEER_SIDE_MAC),
        );
        for (ns, dev, v4, v6) in [
            (&lab.client, &lab.client_if, CLIENT_IP, CLIENT_IP6),
            (
                &lab.relay,
                &lab.relay_client_if,
                RELAY_CLIENT_SIDE_IP,
                RELAY_CLIENT_SIDE_IP6,
            ),
            (
                &lab.relay,
                &lab.relay_peer_if,
                RELAY_PEER_SIDE_IP,
                RELAY_PEER_SIDE_IP6,
            ),
            (&lab.peer, &lab.peer_if, PEER_IP, PEER_IP6),
        ] {
            bring_up(ns, dev, v4, v6);
        }
        for (ns, dev) in [(&lab.client, &lab.client_if), (&lab.peer, &lab.peer_if)] {
            ns.exec("ethtool", &["-K", dev, "tx", "off"]);
        }
        lab
    }

    /// Sets IP forwarding explicitly off in the relay namespace, for both families, globally
    /// and on every interface, and checks it stuck: the kernel fast path must work on a host
    /// that is not a router.
    pub fn force_forwarding_off(&self) {
        force_forwarding_off(&self.relay, &[&self.relay_client_if, &self.relay_peer_if]);
    }

    /// Permanent neighbour entries on every link, both families: no ARP/ND before the first
    /// datagram, so the fast path forwards from the very first frame.
    pub fn add_static_neighbours(&self) {
        let entries = [
            (
                &self.client,
                &self.client_if,
                RELAY_CLIENT_SIDE_IP,
                RELAY_CLIENT_SIDE_IP6,
                RELAY_CLIENT_SIDE_MAC,
            ),
            (
                &self.relay,
                &self.relay_client_if,
                CLIENT_IP,
                CLIENT_IP6,
                CLIENT_MAC,
            ),
            (
                &self.relay,
                &self.relay_peer_if,
                PEER_IP,
                PEER_IP6,
                PEER_MAC,
            ),
            (
                &self.peer,
                &self.peer_if,
                RELAY_PEER_SIDE_IP,
                RELAY_PEER_SIDE_IP6,
                RELAY_PEER_SIDE_MAC,
            ),
        ];
        for (ns, dev, v4, v6, mac) in entries {
            let mac = mac_string(mac);
            for ip in [v4, v6] {
                ns.ip(&[
                    "neigh",
                    "replace",
                    ip,
                    "lladdr",
                    &mac,
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ]);
            }
        }
    }

    /// Whether the client can ping the peer (it must not: the relay does not route).
    pub fn client_reaches_peer(&self) -> bool {
        self.client
            .command("ping")
            .args(["-c", "1", "-W", "1", PEER_IP])
            .output()
            .map(|out| out.status.success())
            .expect("run ping (iputils-ping; `cargo xtask setup` installs it)")
    }
}

impl Default for ThreeHosts {
    fn default() -> Self {
        Self::new()
    }
}

/// Sets IP forwarding off in `ns`, for both families, globally and on each of `devs`, and
/// checks it stuck.
pub fn force_forwarding_off(ns: &Netns, devs: &[&str]) {
    let mut keys = vec![
        "net.ipv4.ip_forward".to_owned(),
        "net.ipv4.conf.all.forwarding".to_owned(),
        "net.ipv6.conf.all.forwarding".to_owned(),
    ];
    for dev in devs {
        keys.push(format!("net.ipv4.conf.{dev}.forwarding"));
        keys.push(format!("net.ipv6.conf.{dev}.forwarding"));
    }
    for key in &keys {
        ns.exec("sysctl", &["-qw", &format!("{key}=0")]);
        let out = ns
            .command("sysctl")
            .args(["-n", key])
            .output()
            .expect("sysctl -n");
        let value = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(value, "0", "{key} is {value} in {}", ns.name());
    }
}

/// The one-NIC lab: the relay has a single interface, as most bare-metal and cloud TURN hosts
/// do, and sends relayed traffic back out of the interface it came in on (XDP_TX).
///
/// ```text
///  client ns  client_if 198.18.1.2/24  2001:2:0:1::2/64 ─┐
///                                                        │   switch ns: bridge with the
///  relay ns   relay_if  198.18.1.1/24  2001:2:0:1::1/64 ─┼── three far veth ends as ports
///                       198.18.3.1/24  2001:2:0:3::1/64  │
///  peer ns    peer_if   198.18.3.2/24  2001:2:0:3::2/64 ─┘
/// ```
///
/// - Client and peer share the L2 segment but not a subnet, and have no routes beyond their
///   own: they can only reach each other through the relay, whose forwarding is off
///   ([`OneNic::client_reaches_peer`] proves it).
/// - The relay listens on its client-subnet address and relays from its peer-subnet address
///   ([`ONE_NIC_RELAY_IP`]), both on `relay_if`.
/// - Neighbours are learnt dynamically (ARP/ND), as on an operator's host.
/// - `switch_relay_if` is the far end of the relay's veth: frames the relay's XDP transmits
///   back (XDP_TX) are only delivered if it runs an XDP program (tests attach XDP_PASS).
/// - TX checksum offload is off on `client_if` and `peer_if`, as in [`ThreeHosts`].
///
/// Dropping it deletes the namespaces and with them every device.
pub struct OneNic {
    pub switch: Netns,
    pub client: Netns,
    pub relay: Netns,
    pub peer: Netns,
    pub bridge: String,
    pub client_if: String,
    pub relay_if: String,
    pub peer_if: String,
    pub switch_client_if: String,
    pub switch_relay_if: String,
    pub switch_peer_if: String,
}

/// The relay's address in the peer subnet of [`OneNic`] (relayed transport addresses).
pub const ONE_NIC_RELAY_IP: &str = "198.18.3.1";
pub const ONE_NIC_RELAY_IP6: &str = "2001:2:0:3::1";
/// The peer of [`OneNic`].
pub const ONE_NIC_PEER_IP: &str = "198.18.3.2";
pub const ONE_NIC_PEER_IP6: &str = "2001:2:0:3::2";
/// The peer subnet of [`OneNic`].
pub const ONE_NIC_PEER_NET: &str = "198.18.3.0/24";
pub const ONE_NIC_PEER_NET6: &str = "2001:2:0:3::/64";

impl OneNic {
    pub fn new() -> Self {
        let switch = Netns::new("l1s");
        let client = Netns::new("l1c");
        let relay = Netns::new("l1r");
        let peer = Netns::new("l1p");
        let suffix = unique_suffix();
        let lab = Self {
            bridge: format!("br{suffix}"),
            client_if: format!("c{suffix}"),
            relay_if: format!("r{suffix}"),
            peer_if: format!("p{suffix}"),
            switch_client_if: format!("sc{suffix}"),
            switch_relay_if: format!("sr{suffix}"),
            switch_peer_if: format!("sp{suffix}"),
            switch,
            client,
            relay,
            peer,
        };
        assert!(
            lab.switch_relay_if.len() <= 15,
            "interface name too long: {}",
            lab.switch_relay_if
        );
        // No multicast snooping: IPv6 neighbour discovery (solicited-node multicast) is
        // flooded like on a dumb switch, without waiting for MLD state.
        lab.switch.ip(&[
            "link",
            "add",
            &lab.bridge,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        lab.switch.ip(&["link", "set", &lab.bridge, "up"]);
        for (ns, dev, mac, port, port_mac) in [
            (
                &lab.client,
                &lab.client_if,
                CLIENT_MAC,
                &lab.switch_client_if,
                [0x02, 0, 0, 0, 0x0b, 0x02],
            ),
            (
                &lab.relay,
                &lab.relay_if,
                RELAY_CLIENT_SIDE_MAC,
                &lab.switch_relay_if,
                [0x02, 0, 0, 0, 0x0b, 0x01],
            ),
            (
                &lab.peer,
                &lab.peer_if,
                PEER_MAC,
                &lab.switch_peer_if,
                [0x02, 0, 0, 0, 0x0b, 0x03],
            ),
        ] {
            veth((ns, dev, mac), (&lab.switch, port, port_mac));
            lab.switch.ip(&["link", "set", port, "master", &lab.bridge]);
            lab.switch.ip(&["link", "set", port, "up"]);
        }
        for (ns, dev, v4, v6) in [
            (&lab.client, &lab.client_if, CLIENT_IP, CLIENT_IP6),
            (
                &lab.relay,
                &lab.relay_if,
                RELAY_CLIENT_SIDE_IP,
                RELAY_CLIENT_SIDE_IP6,
            ),
            (
                &lab.relay,
                &lab.relay_if,
                ONE_NIC_RELAY_IP,
                ONE_NIC_RELAY_IP6,
            ),
            (&lab.peer, &lab.peer_if, ONE_NIC_PEER_IP, ONE_NIC_PEER_IP6),
        ] {
            bring_up(ns, dev, v4, v6);
        }
        for (ns, dev) in [(&lab.client, &lab.client_if), (&lab.peer, &lab.peer_if)] {
            ns.exec("ethtool", &["-K", dev, "tx", "off"]);
        }
        lab
    }

    /// [`force_forwarding_off`] in the relay namespace, on its one interface.
    pub fn force_forwarding_off(&self) {
        force_forwarding_off(&self.relay, &[&self.relay_if]);
    }

    /// Whether the client can ping the peer (it must not: different subnets, no routes, and
    /// the relay does not route).
    pub fn client_reaches_peer(&self) -> bool {
        self.client
            .command("ping")
            .args(["-c", "1", "-W", "1", ONE_NIC_PEER_IP])
            .output()
            .map(|out| out.status.success())
            .expect("run ping (iputils-ping; `cargo xtask setup` installs it)")
    }
}

impl Default for OneNic {
    fn default() -> Self {
        Self::new()
    }
}

/// Creates a veth pair between two namespaces with fixed MACs. Both ends are created in the
/// first namespace and one is moved, so no device ever sits in the test runner's namespace.
/// Gives `dev` in `ns` its IPv4 /24 and IPv6 /64 and brings it up. No DAD for the link-local
/// address either: while it is tentative the kernel sends no neighbour solicitation the relay
/// asks for (ndisc_send_ns needs a source), and the first seconds of IPv6 traffic would take
/// the socket path. An operator's interface is long past DAD.
fn bring_up(ns: &Netns, dev: &str, v4: &str, v6: &str) {
    ns.exec(
        "sysctl",
        &["-qw", &format!("net.ipv6.conf.{dev}.accept_dad=0")],
    );
    ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev]);
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{v6}/64"),
        "dev",
        dev,
        "nodad",
    ]);
    ns.ip(&["link", "set", dev, "up"]);
}

fn veth(a: (&Netns, &str, [u8; 6]), b: (&Netns, &str, [u8; 6])) {
    let (ns_a, dev_a, mac_a) = a;
    let (ns_b, dev_b, mac_b) = b;
    ns_a.ip(&[
        "link",
        "add",
        dev_a,
        "address",
        &mac_string(mac_a),
        "type",
        "veth",
        "peer",
        "name",
        dev_b,
        "address",
        &mac_string(mac_b),
    ]);
    ns_a.ip(&["link", "set", dev_b, "netns", ns_b.name()]);
}

/// `02:00:00:00:01:02` form of a MAC address.
pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A fleet of two relays (issue 13): one client and one peer, each wired to relay A and to
/// relay B, so a client sent from A to B (ALTERNATE-SERVER) reaches B directly and both relays
/// reach the peer.
///
/// ```text
///  client ns                      relay_a ns                          peer ns
///  ca 198.18.11.2/24 <-veth-> ra 198.18.11.1/24
///                              xa 198.18.21.1/24 <-veth-> pa 198.18.21.2/24
///                             relay_b ns
///  cb 198.18.12.2/24 <-veth-> rb 198.18.12.1/24
///                              xb 198.18.22.1/24 <-veth-> pb 198.18.22.2/24
/// ```
///
/// (IPv6: the same hosts in 2001:2:0:11::/64, :12::, :21::, :22::.) Dropping it deletes the
/// namespaces and every device.
pub struct Fleet {
    pub client: Netns,
    pub relay_a: Netns,
    pub relay_b: Netns,
    pub peer: Netns,
    suffix: String,
}

/// Relay A's client-side (listener) address.
pub const FLEET_A_IP: &str = "198.18.11.1";
/// Relay A's relayed address.
pub const FLEET_A_RELAY_IP: &str = "198.18.21.1";
/// Relay B's client-side (listener) address.
pub const FLEET_B_IP: &str = "198.18.12.1";
/// Relay B's relayed address.
pub const FLEET_B_RELAY_IP: &str = "198.18.22.1";
/// The client's address towards A, and towards B.
pub const FLEET_CLIENT_A_IP: &str = "198.18.11.2";
pub const FLEET_CLIENT_B_IP: &str = "198.18.12.2";
/// The peer's address towards A, and towards B.
pub const FLEET_PEER_A_IP: &str = "198.18.21.2";
pub const FLEET_PEER_B_IP: &str = "198.18.22.2";

impl Fleet {
    pub fn new() -> Self {
        let lab = Self {
            client: Netns::new("flc"),
            relay_a: Netns::new("fla"),
            relay_b: Netns::new("flb"),
            peer: Netns::new("flp"),
            suffix: unique_suffix(),
        };
        let name = |prefix: &str| lab.dev(prefix);
        for pair in links_of(&lab).chunks_exact(2) {
            let [(ns_a, prefix_a, ..), (ns_b, prefix_b, ..)] = pair else {
                continue;
            };
            let (dev_a, dev_b) = (name(prefix_a), name(prefix_b));
            ns_a.ip(&[
                "link", "add", &dev_a, "type", "veth", "peer", "name", &dev_b,
            ]);
            ns_a.ip(&["link", "set", &dev_b, "netns", ns_b.name()]);
        }
        for (ns, prefix, v4, v6) in links_of(&lab) {
            bring_up(ns, &name(prefix), v4, v6);
        }
        // Local senders on a veth put partial checksums on frames, which the kernel fast path
        // cannot repair (see ThreeHosts); real NICs deliver complete ones.
        for (ns, prefix) in [
            (&lab.client, "ca"),
            (&lab.client, "cb"),
            (&lab.peer, "pa"),
            (&lab.peer, "pb"),
        ] {
            ns.exec("ethtool", &["-K", &name(prefix), "tx", "off"]);
        }
        lab
    }

    /// The name of the lab's device `ca`, `ra`, `xa`, `pa` (A's side: client, relay's client
    /// side, relay's peer side, peer) or `cb`, `rb`, `xb`, `pb` (B's side).
    pub fn dev(&self, prefix: &str) -> String {
        let name = format!("{prefix}{}", self.suffix);
        assert!(name.len() <= 15, "interface name too long: {name}");
        name
    }
}

/// Every device of a [`Fleet`]: (namespace, name prefix, IPv4, IPv6), veth pairs in order.
fn links_of(lab: &Fleet) -> [(&Netns, &'static str, &'static str, &'static str); 8] {
    [
        (&lab.client, "ca", FLEET_CLIENT_A_IP, "2001:2:0:11::2"),
        (&lab.relay_a, "ra", FLEET_A_IP, "2001:2:0:11::1"),
        (&lab.relay_a, "xa", FLEET_A_RELAY_IP, "2001:2:0:21::1"),
        (&lab.peer, "pa", FLEET_PEER_A_IP, "2001:2:0:21::2"),
        (&lab.client, "cb", FLEET_CLIENT_B_IP, "2001:2:0:12::2"),
        (&lab.relay_b, "rb", FLEET_B_IP, "2001:2:0:12::1"),
        (&lab.relay_b, "xb", FLEET_B_RELAY_IP, "2001:2:0:22::1"),
        (&lab.peer, "pb", FLEET_PEER_B_IP, "2001:2:0:22::2"),
    ]
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new()
    }
}
