//! How allocations end, for usage records: one end per live allocation, with its reason, its
//! 5-tuple, relayed addresses and start; operator disconnects by id and by user (REST usernames
//! by their user part); shutdown ends everything.

use super::harness::*;
use crate::server::{AllocationEnd, EndReason};

fn ended(h: &mut Harness) -> Vec<AllocationEnd> {
    std::iter::from_fn(|| h.server.next_ended()).collect()
}

/// An expiry leaves exactly one end, with the allocation's identity and the time it went live.
#[test]
fn expiry_leaves_one_end() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.advance(secs(3));
    let started = h.now;
    let (id, relayed) = h.allocate(&mut c);
    assert!(ended(&mut h).is_empty(), "nothing ended yet");
    assert_eq!(
        h.server.allocations().next().map(|a| a.started),
        Some(started)
    );
    h.advance(secs(600));
    assert_eq!(h.tick(), vec![Command::DeleteAllocation { id, relayed }]);
    assert_eq!(
        ended(&mut h),
        vec![AllocationEnd {
            id,
            username: "alice".to_owned(),
            realm: REALM.to_owned(),
            client: c.addr,
            listener: c.listener,
            transport: Transport::Udp,
            relayed: vec![relayed],
            started,
            reason: EndReason::Expired,
        }]
    );
    // Later timers and requests find nothing more to end.
    h.advance(secs(600));
    h.tick();
    assert!(ended(&mut h).is_empty());
}

/// RFC 8656 §8: Refresh with LIFETIME 0 ends the allocation with reason `refresh`; a second
/// Refresh 0 gets 437 and leaves no second end.
#[test]
fn refresh_zero_leaves_one_end() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, _) = h.allocate(&mut c);
    h.refresh(&mut c, Some(0));
    let ends = ended(&mut h);
    assert_eq!(ends.len(), 1);
    assert_eq!((ends[0].id, ends[0].reason), (id, EndReason::Refresh));
    let reply = h.request(&mut c, Method::REFRESH, &[Attribute::Lifetime(0)]);
    expect_signed_error(&reply, Method::REFRESH, 437, &c);
    assert!(ended(&mut h).is_empty());
}

/// RFC 8656 §5: the connection of a TCP client closing ends its allocation with reason
/// `connection_closed`; a connection without an allocation leaves nothing.
#[test]
fn connection_close_leaves_one_end() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE).over(Transport::Tcp);
    let (id, _) = h.allocate(&mut c);
    h.server
        .connection_closed(c.addr, c.listener, Transport::Tcp);
    h.drain();
    let ends = ended(&mut h);
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].id, id);
    assert_eq!(ends[0].transport, Transport::Tcp);
    assert_eq!(ends[0].reason, EndReason::ConnectionClosed);
    h.server
        .connection_closed(c.addr, c.listener, Transport::Tcp);
    assert!(h.drain().is_empty());
    assert!(ended(&mut h).is_empty());
}

/// An Allocate whose socket never got bound was never live: its end leaves no record.
#[test]
fn pending_allocation_leaves_no_end() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE).over(Transport::Tcp);
    let (_, commands) = h.signed_commands(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    assert!(matches!(
        commands.as_slice(),
        [Command::CreateAllocation { .. }]
    ));
    h.server
        .connection_closed(c.addr, c.listener, Transport::Tcp);
    h.drain();
    assert!(ended(&mut h).is_empty());
}

/// The operator ends one allocation by id: its channel leaves the fast path, its socket closes,
/// its quota comes back, the end says `disconnected`, and the client's next Refresh gets 437.
/// An unknown id ends nothing.
#[test]
fn disconnect_by_id() {
    let mut h = Harness::with_config(|cfg| cfg.max_allocations_per_user = 1);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    h.channel_bind(&mut c, 0x4000, peer1());

    assert!(!h.server.disconnect(AllocationId(id.0 + 1000)));
    assert!(h.drain().is_empty());
    assert!(ended(&mut h).is_empty());

    assert!(h.server.disconnect(id));
    assert_eq!(
        h.drain(),
        vec![
            delete_binding(id, &c, relayed, peer1(), 0x4000),
            Command::DeleteAllocation { id, relayed },
        ]
    );
    let ends = ended(&mut h);
    assert_eq!(ends.len(), 1);
    assert_eq!((ends[0].id, ends[0].reason), (id, EndReason::Disconnected));
    assert_eq!(h.server.allocations().count(), 0);
    assert!(h.peer_sends(relayed, peer1(), b"late").is_empty());
    // Twice is nothing more.
    assert!(!h.server.disconnect(id));
    assert!(ended(&mut h).is_empty());

    let reply = h.request(&mut c, Method::REFRESH, &[Attribute::Lifetime(600)]);
    expect_signed_error(&reply, Method::REFRESH, 437, &c);
    // The quota (1 per user) was given back.
    let mut again = Client::new("192.0.2.10:50001", ALICE);
    h.allocate(&mut again);
}

/// By user: every live allocation of that user, REST usernames by their user part (whichever
/// side is the REST form), and nobody else's.
#[test]
fn disconnect_by_user_matches_the_quota_user() {
    let mut h = Harness::new();
    let mut static_alice = Client::new("192.0.2.10:50000", ALICE);
    let mut rest_alice = Client::rest("192.0.2.11:50000", UNIX_NOW + 3600, "alice");
    let mut rest_alice2 = Client::rest("192.0.2.12:50000", UNIX_NOW + 7200, "alice");
    let mut bob = Client::new("192.0.2.13:50000", BOB);
    let mut rest_carol = Client::rest("192.0.2.14:50000", UNIX_NOW + 3600, "carol");
    let (a1, _) = h.allocate(&mut static_alice);
    let (a2, _) = h.allocate(&mut rest_alice);
    let (a3, _) = h.allocate(&mut rest_alice2);
    let (b, _) = h.allocate(&mut bob);
    let (c, _) = h.allocate(&mut rest_carol);

    assert!(h.server.disconnect_user("nobody").is_empty());
    assert!(h.server.disconnect_user("alic").is_empty());
    let mut expected = vec![a1, a2, a3];
    expected.sort_unstable();
    assert_eq!(h.server.disconnect_user("alice"), expected);
    h.drain();
    let ends = ended(&mut h);
    assert_eq!(
        ends.iter().map(|e| e.id).collect::<Vec<_>>(),
        expected,
        "one end each, in id order"
    );
    assert!(ends.iter().all(|e| e.reason == EndReason::Disconnected));
    assert_eq!(ends[1].username, format!("{}:alice", UNIX_NOW + 3600));
    let left: Vec<AllocationId> = h.server.allocations().map(|a| a.id).collect();
    assert_eq!(left, vec![b, c]);

    // A full REST username names its user part.
    assert_eq!(
        h.server.disconnect_user(&format!("{}:carol", UNIX_NOW + 1)),
        vec![c]
    );
    h.drain();
    assert_eq!(ended(&mut h).len(), 1);
    assert_eq!(h.server.allocations().count(), 1);
}

/// Shutdown ends every allocation: live ones with reason `shutdown` (a dual one's two relayed
/// addresses in one end), pending ones without an end but with their socket closed.
#[test]
fn end_all_at_shutdown() {
    let mut h = Harness::with_config(|cfg| cfg.relay_ips = vec![relay_v4(), relay_v6()]);
    let mut a = Client::new("192.0.2.10:50000", ALICE);
    let mut b = Client::new("192.0.2.11:50000", BOB);
    let (ida, relayed_a) = h.allocate(&mut a);
    let (tid, commands) = h.signed_commands(
        &mut b,
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::AdditionalAddressFamily(AddressFamily::V6),
        ],
    );
    let [Command::CreateAllocation {
        id: idb,
        relayed: v4,
    }] = commands.as_slice()
    else {
        panic!("expected one CreateAllocation, got {commands:?}");
    };
    let (idb, v4) = (*idb, *v4);
    h.server.allocation_bound(idb, h.now);
    let second = h.drain();
    let [Command::CreateAllocation { relayed: v6, .. }] = second.as_slice() else {
        panic!("expected the IPv6 CreateAllocation");
    };
    let v6 = *v6;
    h.server.allocation_bound(idb, h.now);
    one_reply(h.drain(), &b, tid);
    // A third client's Allocate still waits for its socket.
    let mut pending = Client::new("192.0.2.12:50000", ALICE);
    let (_, commands) = h.signed_commands(
        &mut pending,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let [Command::CreateAllocation {
        id: idp,
        relayed: rp,
    }] = commands.as_slice()
    else {
        panic!("expected one CreateAllocation, got {commands:?}");
    };
    let (idp, rp) = (*idp, *rp);

    h.server.end_all();
    let mut deletes = h.drain();
    deletes.sort_by_key(|c| format!("{c:?}"));
    let mut expected = vec![
        Command::DeleteAllocation {
            id: ida,
            relayed: relayed_a,
        },
        Command::DeleteAllocation {
            id: idb,
            relayed: v4,
        },
        Command::DeleteAllocation {
            id: idb,
            relayed: v6,
        },
        Command::DeleteAllocation {
            id: idp,
            relayed: rp,
        },
    ];
    expected.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(deletes, expected);
    let ends = ended(&mut h);
    assert_eq!(ends.len(), 2, "{ends:?}");
    assert!(ends.iter().all(|e| e.reason == EndReason::Shutdown));
    assert_eq!(ends[0].id, ida);
    assert_eq!(ends[1].id, idb);
    assert_eq!(ends[1].relayed, vec![v4, v6]);
    assert_eq!(h.server.allocations().count(), 0);
    assert_eq!(h.server.poll_timeout(), None);
}
