//! Refresh (RFC 8656 §8): lifetime extension and deletion, 437 without an allocation, and the
//! kernel deadlines that move with the allocation.

use super::harness::*;

/// RFC 8656 §8: Refresh extends the lifetime; LIFETIME 0 deletes the allocation (channels leave
/// the fast path first); afterwards Refresh gets 437.
#[test]
fn refresh_extends_and_deletes() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let t0 = h.now;
    let (id, relayed) = h.allocate(&mut c);
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(600)));

    h.advance(secs(500));
    let reply = h.request(&mut c, Method::REFRESH, &[Attribute::Lifetime(1200)]);
    let msg = expect_success(&reply, Method::REFRESH, &c.key);
    assert_eq!(msg.lifetime(), Some(1200));
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(1700)));
    // Without LIFETIME: the default; above the maximum: the maximum.
    let reply = h.request(&mut c, Method::REFRESH, &[]);
    assert_eq!(
        expect_success(&reply, Method::REFRESH, &c.key).lifetime(),
        Some(600)
    );
    let reply = h.request(&mut c, Method::REFRESH, &[Attribute::Lifetime(u32::MAX)]);
    assert_eq!(
        expect_success(&reply, Method::REFRESH, &c.key).lifetime(),
        Some(3600)
    );
    assert_eq!(h.server.poll_timeout(), Some(t0 + secs(500 + 3600)));

    // Past the original expiry nothing happens.
    h.advance(secs(200));
    assert!(h.tick().is_empty());

    // Two channels, one of which already left the fast path with its permission.
    h.channel_bind(&mut c, 0x4000, peer1());
    h.advance(secs(100));
    h.channel_bind(&mut c, 0x4001, peer2());
    h.advance(secs(250));
    // peer1's permission (installed at +700 s) expires at +1000 s.
    assert_eq!(
        h.tick(),
        vec![delete_binding(id, &c, relayed, peer1(), 0x4000)]
    );

    let commands = h.refresh(&mut c, Some(0));
    assert_eq!(
        commands,
        vec![
            delete_binding(id, &c, relayed, peer2(), 0x4001),
            Command::DeleteAllocation { id, relayed },
        ]
    );
    assert!(h.server.allocations().next().is_none());
    assert_eq!(h.server.poll_timeout(), None);
    // Traffic for the deleted allocation goes nowhere.
    assert!(h.peer_sends(relayed, peer2(), b"late").is_empty());
    assert!(h.channel_data(&c, 0x4001, b"late").is_empty());

    let reply = h.request(&mut c, Method::REFRESH, &[Attribute::Lifetime(600)]);
    expect_signed_error(&reply, Method::REFRESH, 437, &c);
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 437, &c);
}

/// Refresh, CreatePermission and ChannelBind without an allocation → 437 (RFC 8656 §5).
#[test]
fn requests_without_allocation_are_437() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let reply = h.request(&mut c, Method::REFRESH, &[Attribute::Lifetime(600)]);
    expect_signed_error(&reply, Method::REFRESH, 437, &c);
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 437, &c);
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer1()),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 437, &c);
    // Indications and ChannelData without an allocation are silently dropped.
    assert!(h.send_indication(&mut c, peer1(), b"x").is_empty());
    assert!(h.channel_data(&c, 0x4000, b"x").is_empty());
}

/// The kernel's deadline includes the allocation's expiry, and a Refresh moves it.
#[test]
fn kernel_deadline_follows_the_allocation_lifetime() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    let allocated = h.now;
    // 400 s in, the permission (300 s) would outlive the allocation (600 s from the start).
    h.advance(secs(400));
    let commands = h.channel_bind(&mut c, 0x4000, peer1());
    assert_eq!(
        commands,
        vec![create_binding(
            id,
            &c,
            relayed,
            peer1(),
            0x4000,
            allocated + secs(600)
        )]
    );
    let commands = h.refresh(&mut c, Some(600));
    let t = h.now;
    assert_eq!(
        commands,
        vec![create_binding(
            id,
            &c,
            relayed,
            peer1(),
            0x4000,
            t + secs(300)
        )]
    );
}
