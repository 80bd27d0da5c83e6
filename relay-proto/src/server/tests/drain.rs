//! Draining (RFC 8489 §10, RFC 8656 §7.2): a draining relay answers a new Allocate with 508 and
//! a reason phrase that says so (no alternate configured), only after the usual 401; the
//! allocations it has keep working (Refresh, permissions, channels, both directions) until
//! they end. The drain state is shared: draining one server's state drains every server built
//! on it.

use super::harness::*;
use crate::server::{DrainState, DRAINING_REASON};

fn draining(h: &Harness) -> Arc<DrainState> {
    Arc::clone(&h.server.config.drain)
}

/// No alternate: the 401 first (the request is not authenticated yet), then a signed 508
/// whose reason phrase says the server is draining; no socket is asked for.
#[test]
fn draining_refuses_new_allocations_with_508_draining() {
    let mut h = Harness::new();
    let drain = draining(&h);
    assert!(drain.start(h.now, None), "the first start starts it");
    assert!(drain.is_draining());

    let mut c = Client::new("192.0.2.10:50000", ALICE);
    // `request` sends the unsigned Allocate first and expects its 401 with REALM and NONCE.
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let msg = expect_error(&reply, Method::ALLOCATE, 508, Some(&c.key));
    assert_eq!(msg.error_reason(), Some(DRAINING_REASON));
    assert!(msg.alternate_server().is_none());
    assert!(h.server.allocations().next().is_none());
    assert_eq!(h.quota.total(), 0, "nothing taken from the ledger");
    // Counted like every refusal.
    assert!(h
        .server
        .error_responses()
        .any(|(m, code, n)| m == Method::ALLOCATE && code.code() == 508 && n == 1));
}

/// An allocation made before the drain keeps relaying both ways, takes new permissions and
/// channels and refreshes; Refresh with LIFETIME 0 ends it, and then nothing is left.
#[test]
fn existing_allocations_keep_working_while_draining() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    h.create_permission(&mut c, &[peer1()]);
    h.channel_bind(&mut c, 0x4000, peer1());

    draining(&h).start(h.now, Some(h.now + secs(60)));

    assert_eq!(
        h.channel_data(&c, 0x4000, b"ping"),
        vec![to_peer(relayed, peer1(), b"ping")]
    );
    assert_eq!(
        h.peer_sends(relayed, peer1(), b"pong"),
        vec![to_client(
            &c,
            vec![0x40, 0x00, 0x00, 0x04, b'p', b'o', b'n', b'g']
        )]
    );
    // New permissions and channels on the existing allocation are fine.
    h.create_permission(&mut c, &[peer2()]);
    h.channel_bind(&mut c, 0x4001, peer2());
    assert_eq!(
        h.channel_data(&c, 0x4001, b"two"),
        vec![to_peer(relayed, peer2(), b"two")]
    );
    h.advance(secs(30));
    h.refresh(&mut c, Some(600));
    assert_eq!(h.server.allocations().count(), 1);

    // A second allocation on another 5-tuple is refused...
    let mut other = Client::new("192.0.2.11:50000", BOB);
    let reply = h.request(
        &mut other,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 508, &other);

    // ...and the first one ends with Refresh LIFETIME 0: its socket closes.
    let commands = h.refresh(&mut c, Some(0));
    assert!(commands
        .iter()
        .any(|cmd| matches!(cmd, Command::DeleteAllocation { id: gone, .. } if *gone == id)));
    assert!(h.server.allocations().next().is_none());
    assert_eq!(h.quota.total(), 0, "a drained relay has nothing left");
}

/// A retransmission of the Allocate that created an allocation before the drain still gets
/// its success (RFC 8656 §7.2 step 2 comes before the drain check); another Allocate on the
/// same 5-tuple is still 437.
#[test]
fn retransmitted_allocate_still_answered_while_draining() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.challenge(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let tid = c.tid();
    let bytes = c.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        true,
    );
    let id = match h.client_sends(&c, &bytes).as_slice() {
        [Command::CreateAllocation { id, .. }] => *id,
        other => panic!("expected CreateAllocation, got {other:?}"),
    };
    h.server.allocation_bound(id, h.now);
    let first = one_reply(h.drain(), &c, tid);

    draining(&h).start(h.now, None);
    assert_eq!(h.transact(&c, &bytes, tid), first);
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 437, &c);
}

/// One state for every worker: a server built on the same `Arc` drains with it; starting again
/// keeps the start time and replaces the deadline.
#[test]
fn drain_state_is_shared_and_restartable() {
    let shared = Arc::new(DrainState::default());
    let mut h = Harness::with_config(|cfg| cfg.drain = Arc::clone(&shared));
    assert!(!shared.is_draining());
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut c);

    let start = h.now;
    assert!(shared.start(start, Some(start + secs(30))));
    h.advance(secs(5));
    assert!(
        !shared.start(h.now, Some(h.now + secs(5))),
        "already draining"
    );
    assert_eq!(shared.since(), Some(start));
    assert_eq!(shared.deadline(), Some(h.now + secs(5)));

    let mut other = Client::new("192.0.2.12:50000", ALICE);
    let reply = h.request(
        &mut other,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 508, &other);
}
