//! Clients over TCP and TLS (RFC 8656 §5): the transport is part of the 5-tuple, replies and
//! relayed data go back over the client's own transport, and closing the connection ends the
//! allocation.

use super::harness::*;

/// A NAT keeps separate port spaces for UDP and TCP, so a UDP client and a TCP client can share
/// addresses and ports: they are two 5-tuples with an allocation each, and data from either
/// goes through its own allocation and comes back over its own transport.
#[test]
fn udp_and_tcp_clients_on_the_same_addresses_hold_separate_allocations() {
    let mut h = Harness::new();
    let mut udp = Client::new("192.0.2.10:50000", ALICE);
    let mut tcp = Client::new("192.0.2.10:50000", ALICE).over(Transport::Tcp);
    let (udp_id, udp_relayed) = h.allocate(&mut udp);
    let (tcp_id, tcp_relayed) = h.allocate(&mut tcp);
    assert_ne!(udp_id, tcp_id);
    assert_ne!(udp_relayed, tcp_relayed);

    let t = h.now;
    assert_eq!(
        h.channel_bind(&mut tcp, 0x4000, peer1()),
        vec![create_binding(
            tcp_id,
            &tcp,
            tcp_relayed,
            peer1(),
            0x4000,
            t + secs(300)
        )]
    );
    h.channel_bind(&mut udp, 0x4000, peer1());
    assert_eq!(
        h.channel_data(&tcp, 0x4000, b"tcp"),
        vec![to_peer(tcp_relayed, peer1(), b"tcp")]
    );
    assert_eq!(
        h.channel_data(&udp, 0x4000, b"udp"),
        vec![to_peer(udp_relayed, peer1(), b"udp")]
    );
    let back = ChannelData {
        channel: 0x4000,
        data: b"back",
    }
    .encode(false);
    assert_eq!(
        h.peer_sends(tcp_relayed, peer1(), b"back"),
        vec![to_client(&tcp, back.clone())]
    );
    assert_eq!(
        h.peer_sends(udp_relayed, peer1(), b"back"),
        vec![to_client(&udp, back)]
    );
    let transports: Vec<Transport> = h.server.allocations().map(|a| a.transport).collect();
    assert_eq!(transports, [Transport::Udp, Transport::Tcp]);
}

/// Data indications (no channel) and Send indications work over TLS as over UDP.
#[test]
fn send_and_data_indications_over_tls() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE).over(Transport::Tls);
    let (_, relayed) = h.allocate(&mut c);
    h.create_permission(&mut c, &[peer1()]);
    h.permissions.clear();
    assert_eq!(
        h.send_indication(&mut c, peer1(), b"hello"),
        vec![to_peer(relayed, peer1(), b"hello")]
    );
    let commands = h.peer_sends(relayed, peer1(), b"world");
    assert_eq!(data_indication(&commands, &c, peer1()), b"world");
}

/// RFC 8656 §5: when the connection closes the allocation is deleted: its channel leaves the
/// fast-path table, its socket closes, its quota comes back, and the 5-tuple is free again.
#[test]
fn closing_the_connection_deletes_the_allocation() {
    let mut h = Harness::with_config(|cfg| cfg.max_allocations_per_user = 1);
    let mut c = Client::new("192.0.2.10:50000", ALICE).over(Transport::Tcp);
    let (id, relayed) = h.allocate(&mut c);
    h.channel_bind(&mut c, 0x4000, peer1());

    // The same addresses over UDP are another 5-tuple: nothing happens to the TCP allocation.
    h.server
        .connection_closed(c.addr, c.listener, Transport::Udp);
    assert!(h.drain().is_empty());
    assert_eq!(h.server.allocations().count(), 1);

    h.server
        .connection_closed(c.addr, c.listener, Transport::Tcp);
    assert_eq!(
        h.drain(),
        vec![
            delete_binding(id, &c, relayed, peer1(), 0x4000),
            Command::DeleteAllocation { id, relayed },
        ]
    );
    assert_eq!(h.server.allocations().count(), 0);
    assert!(h.channel_data(&c, 0x4000, b"late").is_empty());
    assert!(h.peer_sends(relayed, peer1(), b"late").is_empty());
    // The per-user quota (1) was given back: a new connection allocates again.
    let mut again = Client::new("192.0.2.10:50001", ALICE).over(Transport::Tcp);
    h.allocate(&mut again);
}

/// The reflection budget is for spoofable sources: a TCP client completed a handshake from
/// its address, so its 401s are answered even with no budget at all, while a UDP client from
/// the same address gets nothing.
#[test]
fn stream_clients_are_not_held_to_the_reflection_budget() {
    let limiter = Arc::new(crate::limiter::UnauthLimiter::new(0, 0));
    let shared = Arc::clone(&limiter);
    let mut h = Harness::with_config(move |cfg| cfg.unauth_limiter = shared);
    let mut udp = Client::new("192.0.2.10:50000", ALICE);
    let mut tcp = Client::new("192.0.2.10:50001", ALICE).over(Transport::Tcp);
    for _ in 0..3 {
        let tid = tcp.tid();
        let bytes = tcp.build(
            tid,
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(UDP)],
            false,
        );
        let reply = one_reply(h.client_sends(&tcp, &bytes), &tcp, tid);
        expect_error(&reply, Method::ALLOCATE, 401, None);
    }
    let tid = udp.tid();
    let bytes = udp.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        false,
    );
    assert!(
        h.client_sends(&udp, &bytes).is_empty(),
        "UDP answer over budget is dropped"
    );
}
