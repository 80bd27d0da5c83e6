//! The rtnetlink resolver and the next-hop table against the real kernel, in the
//! three-namespace lab: route answers, neighbour resolution started by `kick_neighbour`, and the
//! table following MAC, route and link changes through monitor events.
//!
//! Everything runs on a thread inside the relay namespace (namespaces are per thread).
//! Forwarding sysctls are never touched: resolving next hops must not need them.

use std::{
    ffi::CString,
    net::IpAddr,
    time::{Duration, Instant},
};

use relay::fastpath::{
    netlink::{Event, Link, Monitor, Route, Rtnl, NUD_REACHABLE, NUD_STALE},
    nexthop::{NextHopId, NextHopValue, NextHops, NEXT_HOP_VALID},
};
use relay_tests::{
    lab::{
        mac_string, ThreeHosts, CLIENT_IP, CLIENT_IP6, CLIENT_MAC, PEER_IP, PEER_MAC,
        RELAY_CLIENT_SIDE_IP, RELAY_CLIENT_SIDE_IP6, RELAY_CLIENT_SIDE_MAC, RELAY_PEER_SIDE_IP,
        RELAY_PEER_SIDE_MAC,
    },
    require_root, run,
};

/// Bound on every wait for the kernel.
const WAIT: Duration = Duration::from_secs(5);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP literal")
}

/// Index of `name` in the calling thread's namespace.
fn ifindex(name: &str) -> u32 {
    let c_name = CString::new(name).expect("interface name");
    // SAFETY: a valid NUL-terminated string, read only for the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    assert_ne!(index, 0, "no interface {name} in this namespace");
    index
}

/// Runs `ip -n NS ARGS`.
fn ip_in(ns: &str, args: &[&str]) {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run("ip", &full);
}

/// The table, its monitor, and every event seen so far.
struct Harness {
    table: NextHops<Rtnl>,
    monitor: Monitor,
    events: Vec<Event>,
    /// Neighbour states read right after each neighbour event: (ip, NUD state or None).
    states: Vec<(IpAddr, Option<u16>)>,
}

impl Harness {
    /// Reads one batch of events (up to 100 ms), feeds it to the table, records it.
    fn pump(&mut self) {
        let events = self
            .monitor
            .next_events(Duration::from_millis(100))
            .expect("monitor");
        self.table.handle(&events);
        for event in &events {
            if let Event::Neighbour { ifindex, ip } = *event {
                let entry = self.table.source_mut().neighbour(ifindex, ip).unwrap();
                self.states.push((ip, entry.map(|n| n.state)));
            }
        }
        self.events.extend(events);
    }

    /// States recorded for `ip`, consecutive repeats folded.
    fn states_of(&self, ip: IpAddr) -> Vec<Option<u16>> {
        let mut states: Vec<Option<u16>> = Vec::new();
        for (seen, state) in &self.states {
            if *seen == ip && states.last() != Some(state) {
                states.push(*state);
            }
        }
        states
    }

    /// Feeds monitor events to the table until `done` holds for the value of `id`, calling
    /// `nudge` about every 1.5 s meanwhile; panics with `what` after [`WAIT`].
    fn wait_for(
        &mut self,
        id: NextHopId,
        what: &str,
        mut nudge: impl FnMut(),
        done: impl Fn(&NextHopValue) -> bool,
    ) -> NextHopValue {
        let start = Instant::now();
        let mut nudged = start;
        loop {
            let value = self.table.value(id).expect("id in use");
            if done(&value) {
                return value;
            }
            assert!(
                start.elapsed() < WAIT,
                "{what}: not after {WAIT:?}; value {value:?}, route {:?}, events {:?}",
                self.table.route(id),
                self.events
            );
            if nudged.elapsed() > Duration::from_millis(1500) {
                nudge();
                nudged = Instant::now();
            }
            self.pump();
        }
    }

    /// Reads events until one matches `wanted`, bounded by [`WAIT`].
    fn wait_event(&mut self, what: &str, wanted: impl Fn(&Event) -> bool) {
        let start = Instant::now();
        while !self.events.iter().any(&wanted) {
            assert!(
                start.elapsed() < WAIT,
                "{what}: no such event; got {:?}",
                self.events
            );
            self.pump();
        }
    }
}

#[test]
fn resolver_follows_the_kernel() {
    require_root();
    let lab = ThreeHosts::new();
    let relay_ns = lab.relay.name().to_owned();
    let client_ns = lab.client.name().to_owned();
    let (rc_name, rp_name, client_if) = (
        lab.relay_client_if.clone(),
        lab.relay_peer_if.clone(),
        lab.client_if.clone(),
    );
    lab.relay.run_inside(move || {
        let rc = ifindex(&rc_name);
        let rp = ifindex(&rp_name);
        // The monitor first, so no event of what follows is missed.
        let monitor = Monitor::open().expect("monitor socket");
        let mut rtnl = Rtnl::open().expect("rtnetlink socket");

        // --- Plain queries ---------------------------------------------------------------
        assert_eq!(
            rtnl.route_to(ip(CLIENT_IP)).unwrap(),
            Route::Unicast {
                oif: rc,
                gateway: None,
                mtu: None
            }
        );
        assert_eq!(
            rtnl.route_to(ip(RELAY_CLIENT_SIDE_IP)).unwrap(),
            Route::Local
        );
        assert_eq!(
            rtnl.route_to(ip(RELAY_CLIENT_SIDE_IP6)).unwrap(),
            Route::Local
        );
        assert_eq!(rtnl.route_to(ip("127.0.0.1")).unwrap(), Route::Local);
        // No default route in the namespace.
        assert_eq!(rtnl.route_to(ip("198.19.9.9")).unwrap(), Route::Unreachable);
        assert_eq!(
            rtnl.route_to(ip("2001:2:0:99::1")).unwrap(),
            Route::Unreachable
        );
        for (kind, v4, v6) in [
            ("blackhole", "198.18.62.0/24", "2001:2:0:62::/64"),
            ("prohibit", "198.18.63.0/24", "2001:2:0:63::/64"),
            ("unreachable", "198.18.64.0/24", "2001:2:0:64::/64"),
        ] {
            ip_in(&relay_ns, &["route", "add", kind, v4]);
            ip_in(&relay_ns, &["-6", "route", "add", kind, v6]);
            let dst4 = ip(&v4.replace(".0/24", ".5"));
            let dst6 = ip(&v6.replace("::/64", "::5"));
            assert_eq!(
                rtnl.route_to(dst4).unwrap(),
                Route::Unreachable,
                "{kind} v4"
            );
            assert_eq!(
                rtnl.route_to(dst6).unwrap(),
                Route::Unreachable,
                "{kind} v6"
            );
        }
        ip_in(
            &relay_ns,
            &["route", "add", "198.18.60.0/24", "via", PEER_IP],
        );
        ip_in(
            &relay_ns,
            &[
                "route",
                "add",
                "198.18.61.0/24",
                "via",
                PEER_IP,
                "mtu",
                "1400",
            ],
        );
        assert_eq!(
            rtnl.route_to(ip("198.18.60.5")).unwrap(),
            Route::Unicast {
                oif: rp,
                gateway: Some(ip(PEER_IP)),
                mtu: None
            }
        );
        assert_eq!(
            rtnl.route_to(ip("198.18.61.5")).unwrap(),
            Route::Unicast {
                oif: rp,
                gateway: Some(ip(PEER_IP)),
                mtu: Some(1400)
            }
        );
        // Source-based policy routing: datagrams from the peer-side address to 198.18.65.0/24
        // go via the peer; everything else has no route there.
        ip_in(
            &relay_ns,
            &["rule", "add", "from", RELAY_PEER_SIDE_IP, "lookup", "165"],
        );
        ip_in(
            &relay_ns,
            &[
                "route",
                "add",
                "198.18.65.0/24",
                "via",
                PEER_IP,
                "table",
                "165",
            ],
        );
        assert_eq!(
            rtnl.route_from(Some(ip(RELAY_PEER_SIDE_IP)), ip("198.18.65.5"))
                .unwrap(),
            Route::Unicast {
                oif: rp,
                gateway: Some(ip(PEER_IP)),
                mtu: None
            }
        );
        assert_eq!(
            rtnl.route_from(Some(ip(RELAY_CLIENT_SIDE_IP)), ip("198.18.65.5"))
                .unwrap(),
            Route::Unreachable
        );
        assert_eq!(
            rtnl.route_to(ip("198.18.65.5")).unwrap(),
            Route::Unreachable
        );
        assert_eq!(
            rtnl.link(rc).unwrap(),
            Some(Link {
                mac: Some(RELAY_CLIENT_SIDE_MAC),
                mtu: 1500,
                up: true
            })
        );
        assert_eq!(rtnl.link(ifindex("lo")).unwrap().map(|l| l.mac), Some(None));
        assert_eq!(rtnl.link(0x7fff_fff0).unwrap(), None);
        assert_eq!(rtnl.neighbour(rc, ip(CLIENT_IP)).unwrap(), None);
        let before = rtnl.addresses().unwrap();
        assert!(
            before.contains(&(rc, ip(RELAY_CLIENT_SIDE_IP))),
            "{before:?}"
        );
        assert!(
            before.contains(&(rc, ip(RELAY_CLIENT_SIDE_IP6))),
            "{before:?}"
        );

        let mut h = Harness {
            table: NextHops::new(rtnl, 64),
            monitor,
            events: Vec::new(),
            states: Vec::new(),
        };
        assert!(h.table.set_attached(&[rc, rp]).is_empty());

        // --- Resolution started by the kick ----------------------------------------------
        let client = h.table.acquire(ip(CLIENT_IP)).expect("free id");
        assert!(
            !h.table.value(client).unwrap().is_valid(),
            "neighbour not resolved yet"
        );
        let resolved = h.wait_for(
            client,
            "client resolved after the kick",
            || {},
            |v| v.is_valid(),
        );
        assert_eq!(
            resolved,
            NextHopValue {
                ifindex: rc,
                mtu: 1500,
                flags: NEXT_HOP_VALID,
                dmac: CLIENT_MAC,
                smac: RELAY_CLIENT_SIDE_MAC,
            }
        );
        h.wait_event("neighbour event for the client", |e| {
            *e == Event::Neighbour {
                ifindex: rc,
                ip: ip(CLIENT_IP),
            }
        });
        let state = h
            .table
            .source_mut()
            .neighbour(rc, ip(CLIENT_IP))
            .unwrap()
            .expect("entry");
        eprintln!("client neighbour after the kick: {state:?}");
        eprintln!(
            "client NUD states seen while resolving: {:?}",
            h.states_of(ip(CLIENT_IP))
        );

        let client6 = h.table.acquire(ip(CLIENT_IP6)).expect("free id");
        let v6 = h.wait_for(client6, "client resolved over ND", || {}, |v| v.is_valid());
        assert_eq!(
            (v6.ifindex, v6.dmac, v6.smac),
            (rc, CLIENT_MAC, RELAY_CLIENT_SIDE_MAC)
        );

        // Behind a gateway, with the route's MTU.
        let far = h.table.acquire(ip("198.18.61.5")).expect("free id");
        let v = h.wait_for(far, "gateway resolved", || {}, |v| v.is_valid());
        assert_eq!(
            (v.ifindex, v.mtu, v.dmac, v.smac),
            (rp, 1400, PEER_MAC, RELAY_PEER_SIDE_MAC)
        );
        // Local and unreachable destinations get ids but never a valid entry.
        let local = h.table.acquire(ip(RELAY_CLIENT_SIDE_IP)).unwrap();
        assert_eq!(h.table.value(local), Some(NextHopValue::default()));
        let nowhere = h.table.acquire(ip("198.18.62.5")).unwrap();
        assert_eq!(h.table.value(nowhere), Some(NextHopValue::default()));

        // --- The client changes its MAC ----------------------------------------------------
        let new_mac = [0x02, 0x00, 0x00, 0x00, 0x01, 0x99];
        ip_in(
            &client_ns,
            &[
                "link",
                "set",
                "dev",
                &client_if,
                "address",
                &mac_string(new_mac),
            ],
        );
        // The client asks for the relay's MAC again; its ARP request carries the new address,
        // which the relay's existing entry takes (once arp locktime, 1 s, has passed).
        let relearn = || {
            ip_in(&client_ns, &["neigh", "flush", "dev", &client_if]);
            let _ = std::process::Command::new("ip")
                .args(["netns", "exec", &client_ns, "ping", "-c", "1", "-W", "1"])
                .arg(RELAY_CLIENT_SIDE_IP)
                .output();
        };
        relearn();
        let moved = h.wait_for(client, "new client MAC", relearn, |v| v.dmac == new_mac);
        assert!(moved.is_valid());

        // --- Route removal and restore ----------------------------------------------------
        let connected = [
            "198.18.1.0/24",
            "dev",
            &rc_name,
            "proto",
            "kernel",
            "scope",
            "link",
        ];
        let mut del = vec!["route", "del"];
        del.extend_from_slice(&connected);
        ip_in(&relay_ns, &del);
        h.wait_for(client, "invalid without a route", || {}, |v| !v.is_valid());
        assert_eq!(h.table.route(client), Some(Route::Unreachable));
        let mut add = vec!["route", "add"];
        add.extend_from_slice(&connected);
        add.extend_from_slice(&["src", RELAY_CLIENT_SIDE_IP]);
        ip_in(&relay_ns, &add);
        let back = h.wait_for(client, "valid with the route back", || {}, |v| v.is_valid());
        assert_eq!(back.dmac, new_mac);

        // --- Link down and up -------------------------------------------------------------
        ip_in(&relay_ns, &["link", "set", &rc_name, "down"]);
        h.wait_for(
            client,
            "invalid with the link down",
            || {},
            |v| !v.is_valid(),
        );
        h.wait_for(
            client6,
            "v6 invalid with the link down",
            || {},
            |v| !v.is_valid(),
        );
        ip_in(&relay_ns, &["link", "set", &rc_name, "up"]);
        // Link down flushed the neighbour entry: the table kicks it again.
        let up = h.wait_for(client, "valid with the link up", || {}, |v| v.is_valid());
        assert_eq!((up.ifindex, up.dmac), (rc, new_mac));
        // The gateway's entry on the other link never changed.
        assert_eq!(h.table.value(far), Some(v));

        // --- Addresses ----------------------------------------------------------------------
        ip_in(
            &relay_ns,
            &["addr", "add", "198.18.77.1/32", "dev", &rc_name],
        );
        h.wait_event("address added", |e| {
            *e == Event::Address {
                ifindex: rc,
                ip: ip("198.18.77.1"),
                added: true,
            }
        });
        let addresses = h.table.source_mut().addresses().unwrap();
        assert!(
            addresses.contains(&(rc, ip("198.18.77.1"))),
            "{addresses:?}"
        );
        ip_in(
            &relay_ns,
            &["addr", "del", "198.18.77.1/32", "dev", &rc_name],
        );
        h.wait_event("address removed", |e| {
            *e == Event::Address {
                ifindex: rc,
                ip: ip("198.18.77.1"),
                added: false,
            }
        });

        // --- Periodic re-confirmation -------------------------------------------------------
        // A STALE entry (what traffic that bypasses the stack leaves behind) is re-confirmed
        // by refresh_neighbours: STALE -> DELAY -> PROBE -> REACHABLE. The first probe waits
        // delay_first_probe_time (5 s by default; 1 s here to keep the test short).
        run(
            "ip",
            &[
                "netns",
                "exec",
                &relay_ns,
                "sysctl",
                "-qw",
                &format!("net.ipv4.neigh.{rc_name}.delay_first_probe_time=1"),
            ],
        );
        ip_in(
            &relay_ns,
            &[
                "neigh",
                "change",
                CLIENT_IP,
                "lladdr",
                &mac_string(new_mac),
                "nud",
                "stale",
                "dev",
                &rc_name,
            ],
        );
        let stale = h.table.source_mut().neighbour(rc, ip(CLIENT_IP)).unwrap();
        assert_eq!(stale.map(|n| n.state), Some(NUD_STALE));
        h.states.clear();
        assert!(
            h.table.refresh_neighbours().is_empty(),
            "STALE is still usable"
        );
        let start = Instant::now();
        loop {
            let entry = h.table.source_mut().neighbour(rc, ip(CLIENT_IP)).unwrap();
            if entry.map(|n| n.state) == Some(NUD_REACHABLE) {
                break;
            }
            assert!(
                start.elapsed() < WAIT,
                "not re-confirmed: {entry:?}, states {:?}",
                h.states_of(ip(CLIENT_IP))
            );
            h.pump();
        }
        eprintln!(
            "client NUD states after refresh_neighbours on STALE: {:?}",
            h.states_of(ip(CLIENT_IP))
        );
        assert_eq!(h.table.value(client).map(|v| v.dmac), Some(new_mac));

        // Nothing above needed IP forwarding.
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                &relay_ns,
                "sysctl",
                "-n",
                "net.ipv4.conf.all.forwarding",
            ],
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    });
}
