//! Allocate (RFC 8656 §7.2): the 401 challenge, socket binding and its retries, lifetimes,
//! retransmissions, REQUESTED-TRANSPORT, address families, EVEN-PORT, reservations, quotas and
//! DONT-FRAGMENT.

use super::harness::*;

/// RFC 8656 §7.2: 401 with REALM and NONCE, then the signed request makes the server ask for a
/// socket; the success waits for `allocation_bound` and carries both addresses and LIFETIME.
#[test]
fn allocate_challenge_then_success() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);

    let tid = c.tid();
    let bytes = c.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        false,
    );
    let reply = h.transact(&c, &bytes, tid);
    let msg = expect_error(&reply, Method::ALLOCATE, 401, None);
    assert_eq!(msg.realm(), Some(REALM));
    c.nonce = Some(msg.nonce().expect("nonce").to_owned());
    assert!(h.server.allocations().next().is_none());

    let tid = c.tid();
    let bytes = c.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        true,
    );
    let commands = h.client_sends(&c, &bytes);
    let (id, relayed) = match commands.as_slice() {
        [Command::CreateAllocation { id, relayed }] => (*id, *relayed),
        other => panic!("expected CreateAllocation, got {other:?}"),
    };
    assert_eq!(relayed.ip(), relay_v4());
    assert!((49152..=65535).contains(&relayed.port()));
    // Still binding: not listed, nothing sent yet.
    assert!(h.server.allocations().next().is_none());

    h.advance(secs(1));
    let bound_at = h.now;
    h.server.allocation_bound(id, h.now);
    let reply = one_reply(h.drain(), &c, tid);
    let msg = expect_success(&reply, Method::ALLOCATE, &c.key);
    assert_eq!(msg.xor_relayed_address(), Some(relayed));
    assert_eq!(msg.xor_mapped_address(), Some(c.addr));
    assert_eq!(msg.lifetime(), Some(600));
    assert!(!msg.has(attr_type::ADDRESS_ERROR_CODE));

    let infos: Vec<_> = h.server.allocations().collect();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].id, id);
    assert_eq!(infos[0].username, ALICE.0);
    assert_eq!((infos[0].client, infos[0].listener), (c.addr, c.listener));
    assert_eq!(infos[0].relayed, relayed);
    // The lifetime runs from the moment the socket is bound.
    assert_eq!(infos[0].expires, bound_at + secs(600));
    assert_eq!(h.server.poll_timeout(), Some(bound_at + secs(600)));
    // A duplicate bind notification changes nothing.
    h.server.allocation_bound(id, h.now);
    assert!(h.drain().is_empty());
}

/// RFC 8656 §7.2 step 7: min(requested, max), never below the default.
#[test]
fn allocate_lifetime_capped_and_floored() {
    let mut h = Harness::new();
    for (i, (requested, granted)) in [(7200u32, 3600u32), (60, 600), (1800, 1800), (0, 600)]
        .into_iter()
        .enumerate()
    {
        let mut c = Client::new(&format!("192.0.2.{}:50000", 10 + i), ALICE);
        let attrs = [
            Attribute::RequestedTransport(UDP),
            Attribute::Lifetime(requested),
        ];
        let (tid, commands) = h.signed_commands(&mut c, Method::ALLOCATE, &attrs);
        let Some(Command::CreateAllocation { id, .. }) = commands.first().cloned() else {
            panic!("expected CreateAllocation, got {commands:?}");
        };
        h.server.allocation_bound(id, h.now);
        let reply = one_reply(h.drain(), &c, tid);
        let msg = expect_success(&reply, Method::ALLOCATE, &c.key);
        assert_eq!(msg.lifetime(), Some(granted), "requested {requested}");
    }
}

/// A failed relay socket bind is retried on another port; after MAX_BIND_ATTEMPTS the client
/// gets 508 and the allocation is gone.
#[test]
fn allocate_bind_failure_retries_then_508() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (tid, commands) = h.signed_commands(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let [Command::CreateAllocation { id, relayed }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    let id = *id;
    let mut tried = vec![*relayed];
    for _ in 1..MAX_BIND_ATTEMPTS {
        h.server.allocation_bind_failed(id, h.now);
        match h.drain().as_slice() {
            [Command::CreateAllocation { id: again, relayed }] => {
                assert_eq!(*again, id, "same allocation, new port");
                assert_eq!(relayed.ip(), relay_v4());
                assert!(!tried.contains(relayed), "{relayed} was tried already");
                tried.push(*relayed);
            }
            other => panic!("expected a retry, got {other:?}"),
        }
    }
    h.server.allocation_bind_failed(id, h.now);
    let reply = one_reply(h.drain(), &c, tid);
    expect_signed_error(&reply, Method::ALLOCATE, 508, &c);
    assert_eq!(h.server.poll_timeout(), None, "nothing left");
    // Late notifications for the dead allocation are ignored.
    h.server.allocation_bound(id, h.now);
    h.server.allocation_bind_failed(id, h.now);
    assert!(h.drain().is_empty());
    // The 5-tuple is free again.
    h.allocate(&mut c);
}

/// With a two-port range, the retry after a failed bind must go to the other port rather than
/// straight back to the one that just failed.
#[test]
fn allocate_bind_retry_avoids_the_failed_port() {
    for seed in 0..32 {
        let mut h = Harness::with_seed(seed, |cfg| cfg.port_range = 50000..=50001);
        let mut c = Client::new("192.0.2.10:50000", ALICE);
        let (tid, commands) = h.signed_commands(
            &mut c,
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(UDP)],
        );
        let [Command::CreateAllocation { id, relayed: first }] = commands.as_slice() else {
            panic!("expected CreateAllocation, got {commands:?}");
        };
        h.server.allocation_bind_failed(*id, h.now);
        match h.drain().as_slice() {
            [Command::CreateAllocation { relayed, .. }] => {
                assert_ne!(relayed, first, "seed {seed}: retried the failed port")
            }
            other => panic!("expected a retry, got {other:?}"),
        }
        // Both ports failed: nothing left to try, 508 right away.
        h.server.allocation_bind_failed(*id, h.now);
        let reply = one_reply(h.drain(), &c, tid);
        expect_signed_error(&reply, Method::ALLOCATE, 508, &c);
    }
}

/// RFC 8656 §7.2: a retransmitted Allocate gets the very same success; a new Allocate on the
/// 5-tuple gets 437.
#[test]
fn allocate_retransmission_and_mismatch() {
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
    let commands = h.client_sends(&c, &bytes);
    let [Command::CreateAllocation { id, .. }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    // Retransmission while the socket is being bound: the answer is still to come.
    assert!(h.client_sends(&c, &bytes).is_empty());
    h.server.allocation_bound(*id, h.now);
    let first = one_reply(h.drain(), &c, tid);
    expect_success(&first, Method::ALLOCATE, &c.key);

    h.advance(secs(2));
    let again = h.transact(&c, &bytes, tid);
    assert_eq!(again, first, "identical response to the retransmission");

    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 437, &c);
    assert_eq!(h.server.allocations().count(), 1);
}

/// RFC 8656 §7.2 step 3: REQUESTED-TRANSPORT missing → 400, not UDP → 442.
#[test]
fn allocate_transport_checks() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let reply = h.request(&mut c, Method::ALLOCATE, &[Attribute::Lifetime(600)]);
    expect_signed_error(&reply, Method::ALLOCATE, 400, &c);
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(TCP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 442, &c);
    assert!(h.server.allocations().next().is_none());
    assert_eq!(h.server.poll_timeout(), None);
}

/// RFC 8656 §7.2 step 6: REQUESTED-ADDRESS-FAMILY / ADDITIONAL-ADDRESS-FAMILY.
#[test]
fn allocate_address_families() {
    let v6_attrs = [
        Attribute::RequestedTransport(UDP),
        Attribute::RequestedAddressFamily(AddressFamily::V6),
    ];
    // No IPv6 relay address: 440.
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let reply = h.request(&mut c, Method::ALLOCATE, &v6_attrs);
    expect_signed_error(&reply, Method::ALLOCATE, 440, &c);
    // Both family attributes: 400.
    let both = [
        Attribute::RequestedTransport(UDP),
        Attribute::RequestedAddressFamily(AddressFamily::V4),
        Attribute::AdditionalAddressFamily(AddressFamily::V6),
    ];
    let reply = h.request(&mut c, Method::ALLOCATE, &both);
    expect_signed_error(&reply, Method::ALLOCATE, 400, &c);
    // Dual allocation asked for, IPv6 part refused with ADDRESS-ERROR-CODE 440.
    let dual = [
        Attribute::RequestedTransport(UDP),
        Attribute::AdditionalAddressFamily(AddressFamily::V6),
    ];
    let (tid, commands) = h.signed_commands(&mut c, Method::ALLOCATE, &dual);
    let [Command::CreateAllocation { id, relayed }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    assert!(relayed.is_ipv4());
    h.server.allocation_bound(*id, h.now);
    let reply = one_reply(h.drain(), &c, tid);
    let msg = expect_success(&reply, Method::ALLOCATE, &c.key);
    assert!(msg.attributes().contains(&Attribute::AddressErrorCode {
        family: AddressFamily::V6,
        error: ErrorCode {
            code: 440,
            reason: "Address Family not Supported",
        },
    }));

    // With an IPv6 relay address: an IPv6 relayed address.
    let mut h = Harness::with_config(|cfg| cfg.relay_ips = vec![relay_v4(), relay_v6()]);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate_with(&mut c, &v6_attrs);
    assert_eq!(relayed.ip(), relay_v6());
    // RFC 8656 §10.2/§12.2: peers of the other family → 443.
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 443, &c);
    h.create_permission(&mut c, &[peer_v6()]);
    assert_eq!(
        h.send_indication(&mut c, peer_v6(), b"v6"),
        vec![to_peer(relayed, peer_v6(), b"v6")]
    );
    // RFC 8656 §8: a Refresh naming the other family → 443.
    let reply = h.request(
        &mut c,
        Method::REFRESH,
        &[Attribute::RequestedAddressFamily(AddressFamily::V4)],
    );
    expect_signed_error(&reply, Method::REFRESH, 443, &c);
}

/// EVEN-PORT with R=0 gets an even port; R=1 and RESERVATION-TOKEN need reservations, which
/// this server does not make → 508 (RFC 8656 §7.2 steps 5 and 7).
#[test]
fn allocate_even_port_and_reservations() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::EvenPort(true),
        ],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 508, &c);
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::ReservationToken([1; 8]),
        ],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 508, &c);
    let (_, relayed) = h.allocate_with(
        &mut c,
        &[
            Attribute::RequestedTransport(UDP),
            Attribute::EvenPort(false),
        ],
    );
    assert_eq!(relayed.port() % 2, 0);
}

/// RFC 8656 §7.2 step 8: per-user quota → 486; total capacity → 508. Freed slots are reusable.
#[test]
fn allocate_quotas() {
    let mut h = Harness::with_config(|cfg| {
        cfg.max_allocations_per_user = 2;
        cfg.max_allocations = 3;
    });
    let mut a1 = Client::new("192.0.2.10:50000", ALICE);
    let mut a2 = Client::new("192.0.2.10:50001", ALICE);
    let mut a3 = Client::new("192.0.2.10:50002", ALICE);
    h.allocate(&mut a1);
    h.allocate(&mut a2);
    let reply = h.request(
        &mut a3,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 486, &a3);

    let mut b1 = Client::new("192.0.2.20:50000", BOB);
    let mut b2 = Client::new("192.0.2.20:50001", BOB);
    h.allocate(&mut b1);
    let reply = h.request(
        &mut b2,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 508, &b2);

    // Deleting one of alice's allocations frees both her quota and the capacity.
    let commands = h.refresh(&mut a1, Some(0));
    assert!(matches!(
        commands.as_slice(),
        [Command::DeleteAllocation { .. }]
    ));
    h.allocate(&mut a3);
}

/// RFC 8656 §7.2 step 4: the server cannot set DF on what it relays, so DONT-FRAGMENT is an
/// unknown comprehension-required attribute; without it the same client allocates.
#[test]
fn allocate_with_dont_fragment_is_420() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.challenge(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let reply = h.request(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP), Attribute::DontFragment],
    );
    let msg = expect_error(&reply, Method::ALLOCATE, 420, Some(&c.key));
    assert!(msg
        .attributes()
        .iter()
        .any(|a| matches!(a, Attribute::UnknownAttributes(l) if l == &[attr_type::DONT_FRAGMENT])));
    assert_eq!(h.server.allocations().count(), 0);
    h.allocate(&mut c);
}

/// Issue 12 item 3: the per-user cap (486) counts TURN REST credentials by their user part, so
/// minting a fresh `expiry:user` credential buys no fresh quota; the relay-wide cap (508) is
/// reached only after the per-user cap let every user in, and both are freed on delete.
#[test]
fn rest_quota_is_keyed_on_the_user_part() {
    let mut h = Harness::with_config(|cfg| {
        cfg.max_allocations_per_user = 2;
        cfg.max_allocations = 3;
    });
    let expiry = UNIX_NOW + 3600;
    let mut m1 = Client::rest("192.0.2.10:50000", expiry, "mallory");
    let mut m2 = Client::rest("192.0.2.10:50001", expiry + 1, "mallory");
    let mut m3 = Client::rest("192.0.2.10:50002", expiry + 2, "mallory");
    h.allocate(&mut m1);
    h.allocate(&mut m2);
    let reply = h.request(
        &mut m3,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let msg = expect_error(&reply, Method::ALLOCATE, 486, Some(&m3.key));
    assert!(msg.attributes().iter().any(|a| matches!(
        a,
        Attribute::ErrorCode(e) if e.reason == "Allocation Quota Reached"
    )));
    // Another user still gets in; the one after that finds the relay full.
    let mut t1 = Client::rest("192.0.2.20:50000", expiry, "trent");
    let mut t2 = Client::rest("192.0.2.20:50001", expiry, "victor");
    h.allocate(&mut t1);
    let reply = h.request(
        &mut t2,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let msg = expect_error(&reply, Method::ALLOCATE, 508, Some(&t2.key));
    assert!(msg.attributes().iter().any(|a| matches!(
        a,
        Attribute::ErrorCode(e) if e.reason == "Insufficient Capacity"
    )));
    // Deleting one of mallory's allocations (made with another credential) frees her quota.
    h.refresh(&mut m1, Some(0));
    h.allocate(&mut m3);
}
