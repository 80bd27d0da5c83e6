//! ChannelBind and ChannelData (RFC 8656 §12): binding rules, forwarding both ways, port 0 and
//! the per-allocation channel cap.

use super::harness::*;

/// RFC 8656 §12.2: success announces the channel to the fast path with the earlier of the
/// channel (600 s) and permission (300 s) deadlines; ChannelData flows both ways.
#[test]
fn channel_bind_and_channel_data() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    let t = h.now;
    let commands = h.channel_bind(&mut c, 0x4000, peer1());
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
    let info = h.server.allocations().next().expect("allocation");
    assert_eq!(info.channels, vec![(0x4000, peer1())]);
    assert_eq!(info.permissions, vec![peer1().ip()]);

    // Client → peer, with 0 to 3 bytes of padding tolerated (RFC 8656 §12.5).
    for pad in 0..=3usize {
        let mut bytes = ChannelData {
            channel: 0x4000,
            data: b"abc",
        }
        .encode(false);
        bytes.extend(std::iter::repeat_n(0u8, pad));
        assert_eq!(
            h.client_sends(&c, &bytes),
            vec![to_peer(relayed, peer1(), b"abc")],
            "padding {pad}"
        );
    }
    // Four trailing bytes are not padding; a length past the end is not ChannelData.
    let mut bytes = ChannelData {
        channel: 0x4000,
        data: b"abc",
    }
    .encode(false);
    bytes.extend([0u8; 4]);
    assert!(h.client_sends(&c, &bytes).is_empty());
    assert!(h
        .client_sends(&c, &[0x40, 0x00, 0x00, 0x08, 1, 2])
        .is_empty());
    // Empty ChannelData is relayed as an empty datagram.
    assert_eq!(
        h.channel_data(&c, 0x4000, b""),
        vec![to_peer(relayed, peer1(), b"")]
    );

    // Peer → client as ChannelData.
    assert_eq!(
        h.peer_sends(relayed, peer1(), b"pong"),
        vec![to_client(
            &c,
            vec![0x40, 0x00, 0x00, 0x04, b'p', b'o', b'n', b'g']
        )]
    );
    // Same peer IP, other port: no channel for that transport address → Data indication.
    let other = SocketAddr::new(peer1().ip(), 6001);
    let commands = h.peer_sends(relayed, other, b"side");
    assert_eq!(data_indication(&commands, &c, other), b"side");

    // Unbound channel numbers are dropped, as is ChannelData from another 5-tuple.
    assert!(h.channel_data(&c, 0x4001, b"x").is_empty());
    assert!(h.channel_data(&c, 0x4FFF, b"x").is_empty());
    let stranger = Client::new("192.0.2.10:50001", ALICE);
    assert!(h.channel_data(&stranger, 0x4000, b"x").is_empty());
    // Send indications to a peer with a channel still work.
    assert_eq!(
        h.send_indication(&mut c, peer1(), b"si"),
        vec![to_peer(relayed, peer1(), b"si")]
    );
}

/// RFC 8656 §12.2: number range, both attributes required, one number per peer and one peer
/// per number; a refresh of the same pair re-announces the binding.
#[test]
fn channel_bind_rules() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    for bad in [0x0000, 0x3FFF, 0x5000, 0x7FFF, 0xFFFF] {
        let reply = h.request(
            &mut c,
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(bad),
                Attribute::XorPeerAddress(peer1()),
            ],
        );
        expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);
    }
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[Attribute::XorPeerAddress(peer1())],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[Attribute::ChannelNumber(0x4000)],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer1()),
            Attribute::XorPeerAddress(peer2()),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);
    // None of that installed anything.
    let info = h.server.allocations().next().expect("allocation");
    assert!(info.channels.is_empty() && info.permissions.is_empty());

    let t0 = h.now;
    h.channel_bind(&mut c, 0x4000, peer1());
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
            Attribute::ChannelNumber(0x4001),
            Attribute::XorPeerAddress(peer1()),
        ],
    );
    expect_signed_error(&reply, Method::CHANNEL_BIND, 400, &c);
    // The highest number is valid.
    h.channel_bind(&mut c, 0x4FFF, peer2());

    // Refresh of the same pair: both deadlines move, the binding is announced again.
    h.advance(secs(100));
    let commands = h.channel_bind(&mut c, 0x4000, peer1());
    assert_eq!(
        commands,
        vec![create_binding(
            id,
            &c,
            relayed,
            peer1(),
            0x4000,
            t0 + secs(400)
        )]
    );
    // A CreatePermission for the peer re-announces the binding with the new permission deadline.
    h.advance(secs(100));
    let (tid, commands) = h.signed_commands(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(SocketAddr::new(peer1().ip(), 1))],
    );
    assert_eq!(commands.len(), 2, "{commands:?}");
    assert_eq!(
        commands[0],
        create_binding(id, &c, relayed, peer1(), 0x4000, t0 + secs(500))
    );
    let reply = one_reply(vec![commands[1].clone()], &c, tid);
    expect_success(&reply, Method::CREATE_PERMISSION, &c.key);
}

/// A channel to port 0 has no destination: 400, nothing installed.
#[test]
fn channel_bind_to_port_zero_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut c);
    let peer = SocketAddr::new(peer1().ip(), 0);
    let attrs = [
        Attribute::ChannelNumber(0x4000),
        Attribute::XorPeerAddress(peer),
    ];
    let (tid, commands) = h.signed_commands(&mut c, Method::CHANNEL_BIND, &attrs);
    let reply = one_reply(commands, &c, tid);
    expect_error(&reply, Method::CHANNEL_BIND, 400, Some(&c.key));
    // A Send indication to port 0 is dropped, even with a permission.
    h.create_permission(&mut c, &[peer1()]);
    assert_eq!(h.send_indication(&mut c, peer, b"x"), vec![]);
}

/// Channels per allocation are capped (508), so one client cannot fill the kernel's table.
#[test]
fn channels_per_allocation_are_capped() {
    let mut h = Harness::with_config(|c| c.max_channels_per_allocation = 2);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut c);
    let port = |p: u16| SocketAddr::new(peer1().ip(), p);
    h.channel_bind(&mut c, 0x4000, port(1000));
    h.channel_bind(&mut c, 0x4001, port(1001));
    let attrs = [
        Attribute::ChannelNumber(0x4002),
        Attribute::XorPeerAddress(port(1002)),
    ];
    let (tid, commands) = h.signed_commands(&mut c, Method::CHANNEL_BIND, &attrs);
    let reply = one_reply(commands, &c, tid);
    expect_error(&reply, Method::CHANNEL_BIND, 508, Some(&c.key));
    // Refreshing an existing channel is not a new one.
    h.channel_bind(&mut c, 0x4001, port(1001));
}

/// Found by the stateful fuzz target (`cargo xtask fuzz server`): a channel whose peer became an
/// address of the host (netlink, at runtime) was re-installed in the fast path by every
/// Refresh. Now the next Refresh withdraws it once, later ones leave it alone, ChannelData to
/// it is refused, and it comes back when the host loses the address.
#[test]
fn a_channel_to_a_peer_that_became_a_host_address_leaves_the_fast_path_once() {
    let mut host = None;
    let mut h = Harness::with_config(|cfg| host = Some(cfg.policy.host_addresses().clone()));
    let host = host.expect("host addresses");
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    h.channel_bind(&mut c, 0x4000, peer1());
    host.replace([peer1().ip()]);
    let commands = h.refresh(&mut c, Some(600));
    assert_eq!(
        commands,
        vec![delete_binding(id, &c, relayed, peer1(), 0x4000)]
    );
    assert_eq!(h.refresh(&mut c, Some(600)), vec![]);
    assert!(h.channel_data(&c, 0x4000, b"to the host").is_empty());
    host.replace([]);
    let t = h.now;
    let commands = h.refresh(&mut c, Some(600));
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

/// The socket path forwards exactly the channels the fast path is told about: the routes
/// follow the channel commands through a permission's expiry, its renewal and the
/// allocation's deletion, and ChannelData follows the routes both ways.
#[test]
fn channel_routes_follow_the_fast_path_commands() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);
    assert_eq!(h.server.commands.routes(), (0, 0));
    h.channel_bind(&mut c, 0x4000, peer1());
    assert_eq!(h.server.commands.routes(), (1, 1));
    let data = ChannelData {
        channel: 0x4000,
        data: b"hi",
    }
    .encode(false);
    assert_eq!(
        h.client_sends(&c, &data),
        vec![to_peer(relayed, peer1(), b"hi")]
    );

    // The permission (300 s) ends before the channel (600 s): the route goes with it.
    h.advance(secs(301));
    h.tick();
    assert_eq!(h.server.commands.routes(), (0, 0));
    assert!(h.client_sends(&c, &data).is_empty());
    assert!(h.peer_sends(relayed, peer1(), b"back").is_empty());

    // A new permission for the peer puts the still-bound channel back.
    let (_, commands) = h.signed_commands(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    assert!(matches!(commands[0], Command::CreateChannelBinding { .. }));
    assert_eq!(h.server.commands.routes(), (1, 1));
    assert_eq!(
        h.client_sends(&c, &data),
        vec![to_peer(relayed, peer1(), b"hi")]
    );
    let back = h.peer_sends(relayed, peer1(), b"back");
    let expected = ChannelData {
        channel: 0x4000,
        data: b"back",
    }
    .encode(false);
    assert_eq!(back, vec![to_client(&c, expected)]);

    h.refresh(&mut c, Some(0));
    assert_eq!(h.server.commands.routes(), (0, 0));
    assert!(h.client_sends(&c, &data).is_empty());
}
