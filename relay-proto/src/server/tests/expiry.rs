//! Expiry (RFC 8656 §7, §9, §12): permissions, channels and their cooldown, allocations (also
//! while their socket is being bound), traffic at the deadline and `poll_timeout`.

use super::harness::*;

/// RFC 8656 §9: when a permission expires its channels leave the fast path and the peer's data
/// is dropped; a new permission brings the channel back.
#[test]
fn permission_expiry() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    let t0 = h.now;
    h.channel_bind(&mut c, 0x4000, peer1());
    h.advance(secs(10));
    h.create_permission(&mut c, &[peer2()]);
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(300)));

    h.advance(secs(289));
    assert!(h.tick().is_empty(), "nothing due yet");
    h.advance(secs(1));
    assert_eq!(
        h.tick(),
        vec![delete_binding(id, &c, relayed, peer1(), 0x4000)]
    );
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(310)));
    assert!(h.peer_sends(relayed, peer1(), b"x").is_empty());
    assert!(h.channel_data(&c, 0x4000, b"x").is_empty());
    assert!(h.send_indication(&mut c, peer1(), b"x").is_empty());
    // peer2 still has its permission.
    let commands = h.peer_sends(relayed, peer2(), b"y");
    assert_eq!(data_indication(&commands, &c, peer2()), b"y");

    h.advance(secs(10));
    assert!(h.tick().is_empty(), "peer2's permission had no channel");
    assert!(h.peer_sends(relayed, peer2(), b"y").is_empty());

    // The channel itself is still bound: a new permission re-installs it, with the channel's
    // own (earlier) deadline.
    h.advance(secs(10));
    let (tid, commands) = h.signed_commands(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert_eq!(
        commands[0],
        create_binding(id, &c, relayed, peer1(), 0x4000, t0 + secs(600))
    );
    one_reply(commands[1..].to_vec(), &c, tid);
    assert_eq!(
        h.channel_data(&c, 0x4000, b"z"),
        vec![to_peer(relayed, peer1(), b"z")]
    );
    assert_eq!(
        h.peer_sends(relayed, peer1(), b"w"),
        vec![to_client(&c, vec![0x40, 0, 0, 1, b'w'])]
    );
}

/// RFC 8656 §12: an expired channel leaves the fast path and stays reserved (number and peer)
/// for 5 minutes; the same pair may be bound again meanwhile, other pairs only afterwards.
#[test]
fn channel_expiry_and_cooldown() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let t0 = h.now;
    let (id, relayed) = h.allocate_with(
        &mut c,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::Lifetime(3600),
        ],
    );
    h.channel_bind(&mut c, 0x4000, peer1());
    // Keep the permission alive past the channel's 600 s.
    h.advance(secs(290));
    let t1 = h.now;
    let (_, commands) = h.signed_commands(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    assert_eq!(
        commands[0],
        create_binding(id, &c, relayed, peer1(), 0x4000, t1 + secs(300))
    );
    h.advance(secs(290));
    let (_, commands) = h.signed_commands(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    assert_eq!(
        commands[0],
        create_binding(id, &c, relayed, peer1(), 0x4000, t0 + secs(600))
    );
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(600)));

    h.advance(secs(20));
    assert_eq!(
        h.tick(),
        vec![delete_binding(id, &c, relayed, peer1(), 0x4000)]
    );
    assert!(h
        .server
        .allocations()
        .next()
        .expect("alloc")
        .channels
        .is_empty());
    // Next deadline: the end of the permission, then of the reservation.
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(880)));
    // ChannelData on the expired channel is dropped; the peer (still permitted) now arrives as
    // Data indications.
    assert!(h.channel_data(&c, 0x4000, b"x").is_empty());
    let commands = h.peer_sends(relayed, peer1(), b"d");
    assert_eq!(data_indication(&commands, &c, peer1()), b"d");

    h.advance(secs(100));
    // During the cooldown: neither the number nor the peer can be bound to something else.
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer2()),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4002),
            Attribute::XorPeerAddress(peer1()),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);

    // Past t0 + 600 + 300 the reservation is gone (the permission too, at t0 + 880).
    h.advance(secs(180));
    assert_eq!(h.now, t0 + secs(880));
    assert!(
        h.tick().is_empty(),
        "the channel left the fast path already"
    );
    assert_eq!(
        h.server.poll_timeout(),
        Some(t0 + secs(600) + CHANNEL_COOLDOWN)
    );
    h.advance(secs(20));
    assert!(h.tick().is_empty());
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(3600)));
    let t2 = h.now;
    assert_eq!(
        h.channel_bind(&mut c, 0x4000, peer2()),
        vec![create_binding(
            id,
            &c,
            relayed,
            peer2(),
            0x4000,
            t2 + secs(300)
        )]
    );
    h.channel_bind(&mut c, 0x4002, peer1());
}

/// Rebinding the same pair during its reserved period is allowed and re-installs it.
#[test]
fn channel_rebind_same_pair_during_cooldown() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate_with(
        &mut c,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::Lifetime(3600),
        ],
    );
    h.channel_bind(&mut c, 0x4000, peer1());
    h.advance(secs(300));
    assert_eq!(
        h.tick(),
        vec![delete_binding(id, &c, relayed, peer1(), 0x4000)]
    );
    h.advance(secs(300));
    // The channel expires now, but it already left the fast path with its permission.
    assert!(h.tick().is_empty());
    h.advance(secs(60));
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
        h.channel_data(&c, 0x4000, b"again"),
        vec![to_peer(relayed, peer1(), b"again")]
    );
    assert_eq!(
        h.server.allocations().next().expect("alloc").channels,
        vec![(0x4000, peer1())]
    );
}

/// RFC 8656 §7: allocation expiry deletes installed channels then the allocation, and frees
/// the 5-tuple and the user's quota.
#[test]
fn allocation_expiry() {
    let mut h = Harness::with_config(|cfg| cfg.max_allocations_per_user = 1);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let t0 = h.now;
    let (id, relayed) = h.allocate(&mut c);
    // Channel to peer1 whose permission lapses first; channel to peer2 still installed at the end.
    h.channel_bind(&mut c, 0x4000, peer1());
    h.advance(secs(400));
    h.channel_bind(&mut c, 0x4001, peer2());
    assert_eq!(
        h.tick(),
        vec![delete_binding(id, &c, relayed, peer1(), 0x4000)]
    );
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(600)));

    h.advance(secs(199));
    assert!(h.tick().is_empty());
    assert_eq!(
        h.channel_data(&c, 0x4001, b"x"),
        vec![to_peer(relayed, peer2(), b"x")]
    );
    h.advance(secs(1));
    assert_eq!(
        h.tick(),
        vec![
            delete_binding(id, &c, relayed, peer2(), 0x4001),
            Command::DeleteAllocation { id, relayed },
        ]
    );
    assert_eq!(h.server.poll_timeout(), None);
    assert!(h.server.allocations().next().is_none());
    assert!(h.tick().is_empty(), "deleted once");
    assert!(h.peer_sends(relayed, peer2(), b"x").is_empty());
    assert!(h.channel_data(&c, 0x4001, b"x").is_empty());
    let reply = h.request(&mut c, Method::REFRESH, &[]);
    expect_signed_error(&reply, Method::REFRESH, 437, &c);
    // Quota and 5-tuple are free again.
    let (id2, _) = h.allocate(&mut c);
    assert_ne!(id2, id);
}

/// Data arriving exactly at the permission deadline (timer not yet run) is not relayed.
#[test]
fn traffic_at_deadline_is_dropped() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);
    h.channel_bind(&mut c, 0x4000, peer1());
    h.advance(secs(300));
    assert!(h.peer_sends(relayed, peer1(), b"x").is_empty());
    assert!(h.channel_data(&c, 0x4000, b"x").is_empty());
}

/// A pending allocation whose socket never gets bound still expires.
#[test]
fn pending_allocation_expires() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let t0 = h.now;
    let (_, commands) = h.signed_commands(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let [Command::CreateAllocation { id, relayed }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(600)));
    // Requests on the 5-tuple see no allocation yet.
    let reply = h.request(&mut c, Method::REFRESH, &[]);
    expect_signed_error(&reply, Method::REFRESH, 437, &c);
    h.advance(secs(600));
    assert_eq!(
        h.tick(),
        vec![Command::DeleteAllocation {
            id: *id,
            relayed: *relayed
        }]
    );
    h.server.allocation_bound(*id, h.now);
    assert!(h.drain().is_empty());
}

/// `poll_timeout` is the earliest deadline across allocations.
#[test]
fn poll_timeout_is_earliest_deadline() {
    let mut h = Harness::new();
    assert_eq!(h.server.poll_timeout(), None);
    let t0 = h.now;
    let mut a = Client::new("192.0.2.10:50000", ALICE);
    let mut b = Client::new("192.0.2.11:50000", BOB);
    h.allocate_with(
        &mut a,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::Lifetime(3600),
        ],
    );
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(3600)));
    h.advance(secs(50));
    h.allocate(&mut b);
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(650)));
    h.advance(secs(50));
    h.create_permission(&mut a, &[peer1()]);
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(400)));
    // Driving the server by its own deadlines always makes progress and ends empty.
    let mut steps = 0;
    while let Some(deadline) = h.server.poll_timeout() {
        assert!(
            deadline >= h.now,
            "deadlines never lie in the past after a tick"
        );
        h.now = deadline;
        h.tick();
        steps += 1;
        assert!(steps < 10, "timer loop does not converge");
    }
    assert!(h.server.allocations().next().is_none());
}
