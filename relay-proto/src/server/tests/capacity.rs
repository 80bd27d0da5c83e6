//! Several relay IPs per family (issue 13, capacity per host): allocations take them in turn,
//! and each IP has the whole port range, so the host holds that many times more allocations.

use super::harness::*;

fn second_v4() -> IpAddr {
    ip("203.0.113.2")
}

/// Two IPv4 relay IPs with one port each: two allocations fit (one per IP, in turn), the third
/// gets 508; freeing one IP's port lets the next allocation use it.
#[test]
fn allocations_spread_over_every_relay_ip_of_the_family() {
    let mut h = Harness::with_config(|cfg| {
        cfg.relay_ips = vec![relay_v4(), second_v4()];
        cfg.port_range = 50_000..=50_000;
    });
    let mut a = Client::new("192.0.2.10:50000", ALICE);
    let mut b = Client::new("192.0.2.11:50000", BOB);
    let (_, first) = h.allocate(&mut a);
    let (_, second) = h.allocate(&mut b);
    let mut ips = [first.ip(), second.ip()];
    ips.sort();
    assert_eq!(
        ips,
        [relay_v4(), second_v4()],
        "one allocation per relay IP"
    );
    assert_eq!((first.port(), second.port()), (50_000, 50_000));

    let mut c = Client::new("192.0.2.12:50000", ALICE);
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 508, &c);

    // The first allocation ends: its address is free again and the next Allocate gets it,
    // whichever IP it tries first.
    h.refresh(&mut a, Some(0));
    let (_, again) = h.allocate(&mut c);
    assert_eq!(again, first);
}

/// A port of one IP failing to bind moves the allocation to another port (of any relay IP of
/// the family): the 508 comes only when every IP's ports failed.
#[test]
fn bind_failures_try_the_other_relay_ips() {
    let mut h = Harness::with_config(|cfg| {
        cfg.relay_ips = vec![relay_v4(), second_v4()];
        cfg.port_range = 50_000..=50_000;
    });
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, commands) = h.signed_commands(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let (id, first) = match commands.as_slice() {
        [Command::CreateAllocation { id, relayed }] => (*id, *relayed),
        other => panic!("expected CreateAllocation, got {other:?}"),
    };
    h.server.allocation_bind_failed(id, h.now);
    let retry = h.drain();
    let second = match retry.as_slice() {
        [Command::CreateAllocation { relayed, .. }] => *relayed,
        other => panic!("expected a second CreateAllocation, got {other:?}"),
    };
    assert_ne!(first.ip(), second.ip(), "the other relay IP");
    h.server.allocation_bound(id, h.now);
    let reply = h.drain();
    assert!(
        matches!(reply.as_slice(), [Command::SendToClient { .. }]),
        "{reply:?}"
    );
    assert_eq!(
        h.server.allocations().next().map(|a| a.relayed),
        Some(second)
    );
}
