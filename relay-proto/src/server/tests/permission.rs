//! CreatePermission (RFC 8656 §10.2), Send and Data indications (§11): permissions, their
//! fast-path commands, the peer policy (403) and the permission cap.

use super::harness::*;

/// RFC 8656 §10, §11: a permission lets Send indications out and peer data in (as Data
/// indications while no channel is bound); other peers stay blocked.
#[test]
fn permission_send_and_data_indications() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);

    // No permission yet: nothing goes either way.
    assert!(h.send_indication(&mut c, peer1(), b"hello").is_empty());
    assert!(h.peer_sends(relayed, peer1(), b"hi").is_empty());

    h.create_permission(&mut c, &[peer1()]);
    assert_eq!(
        h.server.allocations().next().map(|a| a.permissions),
        Some(vec![peer1().ip()])
    );
    assert_eq!(
        h.send_indication(&mut c, peer1(), b"hello"),
        vec![to_peer(relayed, peer1(), b"hello")]
    );
    // Permissions are per IP: any port of that peer may send and be sent to.
    let other_port = SocketAddr::new(peer1().ip(), 9999);
    assert_eq!(
        h.send_indication(&mut c, other_port, b"p"),
        vec![to_peer(relayed, other_port, b"p")]
    );
    let commands = h.peer_sends(relayed, other_port, b"from peer");
    assert_eq!(data_indication(&commands, &c, other_port), b"from peer");
    // Empty payloads are relayed too.
    let commands = h.peer_sends(relayed, peer1(), b"");
    assert_eq!(data_indication(&commands, &c, peer1()), b"");

    // Other peer IPs, and other relayed addresses, are not.
    assert!(h.send_indication(&mut c, peer2(), b"x").is_empty());
    assert!(h.peer_sends(relayed, peer2(), b"x").is_empty());
    let wrong_relayed = SocketAddr::new(relayed.ip(), relayed.port().wrapping_add(1));
    assert!(h.peer_sends(wrong_relayed, peer1(), b"x").is_empty());
    // A Send indication from another 5-tuple is dropped.
    let mut stranger = Client::new("192.0.2.99:50000", ALICE);
    assert!(h.send_indication(&mut stranger, peer1(), b"x").is_empty());
    // A Send indication without DATA is dropped.
    let mut b = MessageBuilder::new(Class::Indication, Method::SEND, c.tid());
    b.add(&Attribute::XorPeerAddress(peer1()));
    assert!(h.client_sends(&c, &b.finish(None, false)).is_empty());
    // So is one with an unknown comprehension-required attribute.
    let mut b = MessageBuilder::new(Class::Indication, Method::SEND, c.tid());
    b.add(&Attribute::XorPeerAddress(peer1()))
        .add(&Attribute::Data(b"x"))
        .add_raw(0x0042, b"");
    assert!(h.client_sends(&c, &b.finish(None, false)).is_empty());
}

/// Several peers in one CreatePermission are installed together.
#[test]
fn create_permission_multiple_peers() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);
    h.create_permission(&mut c, &[peer1(), peer2()]);
    for p in [peer1(), peer2()] {
        assert_eq!(
            h.send_indication(&mut c, p, b"m"),
            vec![to_peer(relayed, p, b"m")]
        );
    }
}

/// The fast path hears of every permission (RFC 8656 §9): installed by CreatePermission and
/// by ChannelBind, refreshed with a new deadline (never past the allocation's), deleted when
/// it expires.
#[test]
fn permission_commands_follow_the_permissions() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    let t0 = h.now;
    let (client, listener) = (c.addr, c.listener);
    let create = move |peer: SocketAddr, expires_at: Instant| Command::CreatePermission {
        id,
        client,
        listener,
        transport: Transport::Udp,
        relayed,
        peer_ip: peer.ip(),
        expires_at,
    };
    h.create_permission(&mut c, &[peer1()]);
    assert_eq!(h.permissions, [create(peer1(), t0 + secs(300))]);
    h.permissions.clear();
    h.advance(secs(10));
    h.channel_bind(&mut c, 0x4000, peer2());
    assert_eq!(h.permissions, [create(peer2(), t0 + secs(310))]);
    h.permissions.clear();
    // An allocation refresh re-announces every permission (its deadline may have moved).
    h.refresh(&mut c, Some(600));
    let mut announced = h.permissions.clone();
    announced.sort_by_key(|c| format!("{c:?}"));
    let mut expected = vec![
        create(peer1(), t0 + secs(300)),
        create(peer2(), t0 + secs(310)),
    ];
    expected.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(announced, expected);
    h.permissions.clear();
    // Expiry deletes them.
    h.advance(secs(290));
    h.tick();
    assert_eq!(
        h.permissions,
        [Command::DeletePermission {
            id,
            relayed,
            peer_ip: peer1().ip(),
        }]
    );
}

/// Peer policy (architecture "Safety defaults", RFC 8656 §21): 403, and all-or-nothing.
#[test]
fn create_permission_policy_denied_is_403() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut c);
    for denied in [
        "127.0.0.1:80",
        "10.1.2.3:80",
        "169.254.169.254:80",
        "192.168.0.1:80",
        "100.64.0.1:80",
        "224.0.0.1:80",
        "0.0.0.0:80",
        "255.255.255.255:80",
    ] {
        let reply = h.request(
            &mut c,
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(sa(denied))],
        );
        expect_signed_error(&reply, Method::CREATE_PERMISSION, 403, &c);
        let reply = h.request(
            &mut c,
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(0x4000),
                Attribute::XorPeerAddress(sa(denied)),
            ],
        );
        expect_signed_error(&reply, Method::CHANNEL_BIND, 403, &c);
    }
    // The allowed neighbour of the relay address is fine.
    h.create_permission(&mut c, &[sa("203.0.113.50:9")]);
    // One denied peer spoils the whole request.
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[
            Attribute::XorPeerAddress(peer1()),
            Attribute::XorPeerAddress(sa("127.0.0.1:1")),
        ],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 403, &c);
    assert!(h.send_indication(&mut c, peer1(), b"x").is_empty());
    // An IPv6 peer on an IPv4 allocation is a family mismatch, checked first.
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(sa("[::1]:1"))],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 443, &c);
    assert_eq!(
        h.server.allocations().next().map(|a| a.permissions),
        Some(vec![ip("203.0.113.50")])
    );
}

/// Permissions per allocation are capped (508); refreshing an existing one still works;
/// CreatePermission without XOR-PEER-ADDRESS → 400.
#[test]
fn create_permission_cap_and_missing_peer() {
    let mut h = Harness::with_config(|cfg| cfg.max_permissions_per_allocation = 2);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);
    let reply = h.request(&mut c, Method::CREATE_PERMISSION, &[]);
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 400, &c);

    h.create_permission(&mut c, &[peer1()]);
    // Two new ones with one slot left: refused as a whole.
    let p3 = sa("8.8.8.8:53");
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[
            Attribute::XorPeerAddress(peer2()),
            Attribute::XorPeerAddress(p3),
        ],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 508, &c);
    assert!(h.send_indication(&mut c, peer2(), b"x").is_empty());

    h.create_permission(&mut c, &[peer2()]);
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(p3)],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 508, &c);
    // ChannelBind to a third IP needs a permission slot too.
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(p3),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 508, &c);
    // Refreshing existing permissions (same IP, any port) is not capped.
    h.create_permission(&mut c, &[peer1(), SocketAddr::new(peer2().ip(), 1)]);
    h.channel_bind(&mut c, 0x4000, peer1());
    // Once one expires, the slot is free again.
    h.advance(secs(301));
    h.tick();
    h.create_permission(&mut c, &[p3]);
    assert_eq!(
        h.send_indication(&mut c, p3, b"y"),
        vec![to_peer(relayed, p3, b"y")]
    );
}
