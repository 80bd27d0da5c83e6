//! Address families (RFC 8656 §7.2, §9, §12; RFC 6156): relaying across families, 440 without
//! a relay IP of the family, and dual allocations (ADDITIONAL-ADDRESS-FAMILY).

use super::harness::*;

fn dual_stack(cfg: &mut ServerConfig) {
    cfg.relay_ips = vec![relay_v4(), relay_v6()];
}

fn listener_v6() -> SocketAddr {
    sa("[2001:db8::1]:3478")
}

/// A client on IPv6, talking to the relay's IPv6 listener.
fn client_v6() -> Client {
    let mut c = Client::new("[2001:db8:ffff::10]:50000", ALICE);
    c.listener = listener_v6();
    c
}

/// Every XOR-RELAYED-ADDRESS of a response, in order.
fn relayed_addresses(msg: &Message<'_>) -> Vec<SocketAddr> {
    msg.attributes()
        .iter()
        .filter_map(|a| match a {
            Attribute::XorRelayedAddress(r) => Some(*r),
            _ => None,
        })
        .collect()
}

const DUAL: [Attribute<'static>; 2] = [
    Attribute::RequestedTransport(UDP),
    Attribute::AdditionalAddressFamily(AddressFamily::V6),
];

impl Harness {
    /// A dual allocation: CreateAllocation for the IPv4 address, then (once bound) for the
    /// IPv6 one, then the success with both; returns (id, IPv4 relayed, IPv6 relayed).
    #[track_caller]
    fn allocate_dual(&mut self, client: &mut Client) -> (AllocationId, SocketAddr, SocketAddr) {
        let (tid, commands) = self.signed_commands(client, Method::ALLOCATE, &DUAL);
        let [Command::CreateAllocation { id, relayed: v4 }] = commands.as_slice() else {
            panic!("expected one CreateAllocation, got {commands:?}");
        };
        let (id, v4) = (*id, *v4);
        assert_eq!(v4.ip(), relay_v4());
        self.server.allocation_bound(id, self.now);
        let commands = self.drain();
        let [Command::CreateAllocation {
            id: second,
            relayed: v6,
        }] = commands.as_slice()
        else {
            panic!("expected the IPv6 CreateAllocation, got {commands:?}");
        };
        let v6 = *v6;
        assert_eq!((*second, v6.ip()), (id, relay_v6()));
        self.server.allocation_bound(id, self.now);
        let reply = one_reply(self.drain(), client, tid);
        let msg = expect_success(&reply, Method::ALLOCATE, &client.key);
        assert_eq!(relayed_addresses(&msg), vec![v4, v6]);
        assert_eq!(msg.xor_mapped_address(), Some(client.addr));
        assert!(
            !msg.attributes()
                .iter()
                .any(|a| matches!(a, Attribute::AddressErrorCode { .. })),
            "both families granted: no ADDRESS-ERROR-CODE"
        );
        (id, v4, v6)
    }
}

/// RFC 6156 / RFC 8656 §7.2 step 6: an IPv4 client asks for an IPv6 relayed address; data
/// crosses families both ways (ChannelData and Send/Data indications).
#[test]
fn ipv4_client_relays_to_ipv6_peers() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate_with(
        &mut c,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::RequestedAddressFamily(AddressFamily::V6),
        ],
    );
    assert_eq!(relayed.ip(), relay_v6());
    // An IPv4 peer has no relayed address of its family here: 443 (RFC 8656 §9, §12).
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 443, &c);
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer1()),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 443, &c);

    // The binding names the IPv6 relayed address; the kernel sync keeps it (mixed) off the
    // kernel, the socket path carries it.
    let t = h.now;
    assert_eq!(
        h.channel_bind(&mut c, 0x4000, peer_v6()),
        vec![create_binding(
            id,
            &c,
            relayed,
            peer_v6(),
            0x4000,
            t + secs(300)
        )]
    );
    assert_eq!(
        h.channel_data(&c, 0x4000, b"to v6"),
        vec![to_peer(relayed, peer_v6(), b"to v6")]
    );
    assert_eq!(
        h.peer_sends(relayed, peer_v6(), b"back"),
        vec![to_client(
            &c,
            vec![0x40, 0x00, 0x00, 0x04, b'b', b'a', b'c', b'k']
        )]
    );
    // Send indication out of the IPv6 socket; a reply from a port without a channel comes back
    // as a Data indication with an IPv6 XOR-PEER-ADDRESS over IPv4.
    let other = SocketAddr::new(peer_v6().ip(), 8001);
    assert_eq!(
        h.send_indication(&mut c, other, b"si"),
        vec![to_peer(relayed, other, b"si")]
    );
    let commands = h.peer_sends(relayed, other, b"di");
    assert_eq!(data_indication(&commands, &c, other), b"di");
    // A Send indication to an IPv4 peer is dropped: no relayed address of its family.
    assert!(h.send_indication(&mut c, peer1(), b"no").is_empty());
}

/// The mirror case: an IPv6 client asks for an IPv4 relayed address (RFC 8656 §7.2 step 6).
#[test]
fn ipv6_client_relays_to_ipv4_peers() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = client_v6();
    let (id, relayed) = h.allocate_with(
        &mut c,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::RequestedAddressFamily(AddressFamily::V4),
        ],
    );
    assert_eq!(relayed.ip(), relay_v4());
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer_v6())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 443, &c);
    let t = h.now;
    assert_eq!(
        h.channel_bind(&mut c, 0x4000, peer1()),
        vec![create_binding(
            id,
            &c,
            relayed,
            peer1(),
            0x4000,
            t + secs(300)
        )]
    );
    assert_eq!(
        h.channel_data(&c, 0x4000, b"to v4"),
        vec![to_peer(relayed, peer1(), b"to v4")]
    );
    assert_eq!(
        h.peer_sends(relayed, peer1(), b"back"),
        vec![to_client(
            &c,
            vec![0x40, 0x00, 0x00, 0x04, b'b', b'a', b'c', b'k']
        )]
    );
    h.create_permission(&mut c, &[peer2()]);
    assert_eq!(
        h.send_indication(&mut c, peer2(), b"si"),
        vec![to_peer(relayed, peer2(), b"si")]
    );
    let commands = h.peer_sends(relayed, peer2(), b"di");
    assert_eq!(data_indication(&commands, &c, peer2()), b"di");
    // Without REQUESTED-ADDRESS-FAMILY an IPv6 client also gets IPv4 (the RFC's default).
    let mut d = client_v6();
    d.addr = sa("[2001:db8:ffff::10]:50001");
    let (_, default) = h.allocate(&mut d);
    assert_eq!(default.ip(), relay_v4());
}

/// RFC 8656 §7.2 step 6: a family without a relay IP of its own is 440, whatever the client's
/// family.
#[test]
fn cross_family_without_a_relay_ip_is_440() {
    // IPv4 only: an IPv4 client asking for IPv6.
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::RequestedAddressFamily(AddressFamily::V6),
        ],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 440, &c);
    // IPv6 only: an IPv6 client asking for IPv4, explicitly or by default, and a dual
    // allocation (its IPv4 half is the required one).
    let mut h = Harness::with_config(|cfg| cfg.relay_ips = vec![relay_v6()]);
    let mut c = client_v6();
    let v4 = [
        Attribute::RequestedTransport(UDP),
        Attribute::RequestedAddressFamily(AddressFamily::V4),
    ];
    let reply = h.request(&mut c, Method::ALLOCATE, &v4);
    expect_signed_error(&reply, Method::ALLOCATE, 440, &c);
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 440, &c);
    let reply = h.request(&mut c, Method::ALLOCATE, &DUAL);
    expect_signed_error(&reply, Method::ALLOCATE, 440, &c);
    assert!(h.server.allocations().next().is_none());
    assert_eq!(h.quota.total(), 0, "refusals hold no quota");
}

/// RFC 8656 §7.2 step 6: REQUESTED-ADDRESS-FAMILY together with ADDITIONAL-ADDRESS-FAMILY is
/// 400 even when both families could be served; ADDITIONAL-ADDRESS-FAMILY IPv4 is 400.
#[test]
fn dual_allocation_attribute_rules() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    for family in [AddressFamily::V4, AddressFamily::V6] {
        let reply = h.request(
            &mut c,
            Method::ALLOCATE,
            &[
                Attribute::RequestedTransport(UDP),
                Attribute::RequestedAddressFamily(family),
                Attribute::AdditionalAddressFamily(AddressFamily::V6),
            ],
        );
        expect_signed_error(&reply, Method::ALLOCATE, 400, &c);
    }
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::AdditionalAddressFamily(AddressFamily::V4),
        ],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 400, &c);
    assert!(h.server.allocations().next().is_none());
}

/// A dual allocation: two relayed addresses, one socket each, one allocation id and one
/// quota unit; permissions and channels use the relayed address of the peer's family.
#[test]
fn dual_allocation_relays_per_family() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, v4, v6) = h.allocate_dual(&mut c);
    assert_eq!(h.quota.of_user(ALICE.0), 1);
    let info = h.server.allocations().next().expect("allocation");
    assert_eq!(
        (info.id, info.relayed, info.additional_relayed),
        (id, v4, Some(v6))
    );
    assert!(h.server.config.live_relayed.contains(v4) && h.server.config.live_relayed.contains(v6));

    // One CreatePermission may name peers of both families (RFC 8656 §10.2).
    h.create_permission(&mut c, &[peer2(), peer_v6()]);
    assert_eq!(
        h.send_indication(&mut c, peer2(), b"four"),
        vec![to_peer(v4, peer2(), b"four")]
    );
    assert_eq!(
        h.send_indication(&mut c, peer_v6(), b"six"),
        vec![to_peer(v6, peer_v6(), b"six")]
    );
    let commands = h.peer_sends(v6, peer_v6(), b"six back");
    assert_eq!(data_indication(&commands, &c, peer_v6()), b"six back");
    let commands = h.peer_sends(v4, peer2(), b"four back");
    assert_eq!(data_indication(&commands, &c, peer2()), b"four back");

    // Channels: each binding carries the relayed address of its peer's family, so the IPv4
    // one (all one family with this IPv4 client) can go to the kernel.
    let t = h.now;
    assert_eq!(
        h.channel_bind(&mut c, 0x4000, peer1()),
        vec![create_binding(id, &c, v4, peer1(), 0x4000, t + secs(300))]
    );
    assert_eq!(
        h.channel_bind(&mut c, 0x4001, peer_v6()),
        vec![create_binding(id, &c, v6, peer_v6(), 0x4001, t + secs(300))]
    );
    assert_eq!(
        h.channel_data(&c, 0x4000, b"a"),
        vec![to_peer(v4, peer1(), b"a")]
    );
    assert_eq!(
        h.channel_data(&c, 0x4001, b"b"),
        vec![to_peer(v6, peer_v6(), b"b")]
    );
    assert_eq!(
        h.peer_sends(v6, peer_v6(), b"c"),
        vec![to_client(&c, vec![0x40, 0x01, 0x00, 0x01, b'c'])]
    );
    assert_eq!(
        h.peer_sends(v4, peer1(), b"d"),
        vec![to_client(&c, vec![0x40, 0x00, 0x00, 0x01, b'd'])]
    );
    // Policy applies per peer as for any allocation: a ULA peer is 403.
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(sa("[fd00::1]:9"))],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 403, &c);

    // RFC 8656 §8: either family refreshes the (one) lifetime and re-announces both channels.
    let t = h.now;
    for family in [AddressFamily::V4, AddressFamily::V6] {
        let attrs = [
            Attribute::RequestedAddressFamily(family),
            Attribute::Lifetime(600),
        ];
        let (tid, mut commands) = h.signed_commands(&mut c, Method::REFRESH, &attrs);
        let reply = one_reply(commands.split_off(2), &c, tid);
        expect_success(&reply, Method::REFRESH, &c.key);
        assert_eq!(
            commands,
            vec![
                create_binding(id, &c, v4, peer1(), 0x4000, t + secs(300)),
                create_binding(id, &c, v6, peer_v6(), 0x4001, t + secs(300)),
            ]
        );
    }

    // Deleting closes both sockets after the channels left the fast path.
    assert_eq!(
        h.refresh(&mut c, Some(0)),
        vec![
            delete_binding(id, &c, v4, peer1(), 0x4000),
            delete_binding(id, &c, v6, peer_v6(), 0x4001),
            Command::DeleteAllocation { id, relayed: v4 },
            Command::DeleteAllocation { id, relayed: v6 },
        ]
    );
    assert!(h.server.allocations().next().is_none());
    assert_eq!(h.quota.of_user(ALICE.0), 0);
    assert!(
        !h.server.config.live_relayed.contains(v4) && !h.server.config.live_relayed.contains(v6)
    );
    assert!(h.peer_sends(v6, peer_v6(), b"late").is_empty());
    assert!(h.channel_data(&c, 0x4001, b"late").is_empty());
}

/// An expiring dual allocation closes both sockets.
#[test]
fn dual_allocation_expiry_closes_both_sockets() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, v4, v6) = h.allocate_dual(&mut c);
    h.advance(secs(600));
    assert_eq!(
        h.tick(),
        vec![
            Command::DeleteAllocation { id, relayed: v4 },
            Command::DeleteAllocation { id, relayed: v6 },
        ]
    );
    assert_eq!(h.server.poll_timeout(), None);
}

/// An IPv6 client's dual allocation: its IPv6 channels are same-family (kernel-capable), its
/// IPv4 ones cross families.
#[test]
fn dual_allocation_from_an_ipv6_client() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = client_v6();
    let (id, v4, v6) = h.allocate_dual(&mut c);
    let t = h.now;
    assert_eq!(
        h.channel_bind(&mut c, 0x4000, peer_v6()),
        vec![create_binding(id, &c, v6, peer_v6(), 0x4000, t + secs(300))]
    );
    assert_eq!(
        h.channel_bind(&mut c, 0x4001, peer1()),
        vec![create_binding(id, &c, v4, peer1(), 0x4001, t + secs(300))]
    );
    assert_eq!(
        h.peer_sends(v4, peer1(), b"x"),
        vec![to_client(&c, vec![0x40, 0x01, 0x00, 0x01, b'x'])]
    );
}

/// The IPv6 socket of a dual allocation cannot be bound: after the retries the IPv4 address
/// is granted alone with ADDRESS-ERROR-CODE 508 for IPv6 (RFC 8656 §7.2), and deleting it
/// closes only the socket it has.
#[test]
fn dual_allocation_without_an_ipv6_socket_is_ipv4_with_508() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (tid, commands) = h.signed_commands(&mut c, Method::ALLOCATE, &DUAL);
    let [Command::CreateAllocation { id, relayed: v4 }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    let (id, v4) = (*id, *v4);
    h.server.allocation_bound(id, h.now);
    let mut tried = Vec::new();
    let mut commands = h.drain();
    for _ in 0..MAX_BIND_ATTEMPTS {
        let [Command::CreateAllocation { id: again, relayed }] = commands.as_slice() else {
            panic!("expected an IPv6 CreateAllocation, got {commands:?}");
        };
        assert_eq!(*again, id);
        assert_eq!(relayed.ip(), relay_v6());
        assert!(!tried.contains(relayed), "a failed port is not retried");
        tried.push(*relayed);
        h.server.allocation_bind_failed(id, h.now);
        commands = h.drain();
    }
    let reply = one_reply(commands, &c, tid);
    let msg = expect_success(&reply, Method::ALLOCATE, &c.key);
    assert_eq!(relayed_addresses(&msg), vec![v4]);
    assert!(msg.attributes().contains(&Attribute::AddressErrorCode {
        family: AddressFamily::V6,
        error: ErrorCode {
            code: 508,
            reason: "Insufficient Capacity",
        },
    }));
    let info = h.server.allocations().next().expect("allocation");
    assert_eq!(info.additional_relayed, None);
    // IPv6 peers: 443, this allocation has no IPv6 relayed address after all.
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer_v6())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 443, &c);
    let reply = h.request(
        &mut c,
        Method::REFRESH,
        &[Attribute::RequestedAddressFamily(AddressFamily::V6)],
    );
    expect_signed_error(&reply, Method::REFRESH, 443, &c);
    assert_eq!(
        h.refresh(&mut c, Some(0)),
        vec![Command::DeleteAllocation { id, relayed: v4 }]
    );
}

/// A retransmitted dual Allocate while the IPv6 socket is being bound gets nothing yet, then
/// the same success as the original.
#[test]
fn dual_allocation_retransmission() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.challenge(&mut c, Method::ALLOCATE, &DUAL);
    let tid = c.tid();
    let bytes = c.build(tid, Method::ALLOCATE, &DUAL, true);
    let commands = h.client_sends(&c, &bytes);
    let [Command::CreateAllocation { id, .. }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    let id = *id;
    h.server.allocation_bound(id, h.now);
    assert_eq!(h.drain().len(), 1, "the IPv6 CreateAllocation");
    assert!(h.client_sends(&c, &bytes).is_empty());
    h.server.allocation_bound(id, h.now);
    let first = one_reply(h.drain(), &c, tid);
    let again = h.transact(&c, &bytes, tid);
    assert_eq!(first, again);
    assert_eq!(h.quota.of_user(ALICE.0), 1);
}

/// EVEN-PORT (R=0) on a dual allocation: both relayed ports are even.
#[test]
fn dual_allocation_even_ports() {
    let mut h = Harness::with_config(dual_stack);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (tid, commands) = h.signed_commands(
        &mut c,
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::AdditionalAddressFamily(AddressFamily::V6),
            Attribute::EvenPort(false),
        ],
    );
    let [Command::CreateAllocation { id, relayed: v4 }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    let (id, v4) = (*id, *v4);
    h.server.allocation_bound(id, h.now);
    let commands = h.drain();
    let [Command::CreateAllocation { relayed: v6, .. }] = commands.as_slice() else {
        panic!("expected the IPv6 CreateAllocation, got {commands:?}");
    };
    let v6 = *v6;
    h.server.allocation_bound(id, h.now);
    let reply = one_reply(h.drain(), &c, tid);
    let msg = expect_success(&reply, Method::ALLOCATE, &c.key);
    assert_eq!(relayed_addresses(&msg), vec![v4, v6]);
    assert!(v4.port() % 2 == 0 && v6.port() % 2 == 0, "{v4} {v6}");
}
