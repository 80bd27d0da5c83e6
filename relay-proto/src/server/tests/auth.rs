//! Long-term and REST credentials (RFC 8489 §9.2): wrong passwords, stale nonces, SHA-256
//! integrity, another user on the 5-tuple (RFC 8656 §5) and the unauthenticated rate limit.

use super::harness::*;
use crate::limiter::UnauthLimiter;

/// RFC 8489 §9.2.4: wrong password or unknown user → 401 with a fresh NONCE, unsigned.
#[test]
fn wrong_password_is_401() {
    let mut h = Harness::new();
    for creds in [(ALICE.0, "not-the-password"), ("mallory", "whatever")] {
        let mut c = Client::new("192.0.2.10:50000", creds);
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
        let reply = h.transact(&c, &bytes, tid);
        let msg = expect_error(&reply, Method::ALLOCATE, 401, None);
        assert_eq!(msg.realm(), Some(REALM));
        assert!(msg.nonce().is_some());
    }
    assert!(h.server.allocations().next().is_none());
}

/// MESSAGE-INTEGRITY present but USERNAME/REALM/NONCE missing → 400 (RFC 8489 §9.2.4).
#[test]
fn integrity_without_username_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let tid = c.tid();
    let mut b = MessageBuilder::new(Class::Request, Method::ALLOCATE, tid);
    b.add(&Attribute::RequestedTransport(UDP));
    let bytes = b.finish(Some(c.key.as_bytes()), true);
    let reply = h.transact(&c, &bytes, tid);
    expect_error(&reply, Method::ALLOCATE, 400, None);
}

/// RFC 8489 §9.2.4: a nonce past its lifetime → 438 with REALM and a new NONCE (signed, which
/// §9.2.4 allows); the retry with the new nonce succeeds.
#[test]
fn stale_nonce_is_438_with_new_nonce() {
    let mut h = Harness::with_config(|cfg| cfg.nonce_lifetime = secs(60));
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.challenge(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let old = c.nonce.clone().expect("nonce");
    h.advance(secs(61));
    let tid = c.tid();
    let bytes = c.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        true,
    );
    let reply = h.transact(&c, &bytes, tid);
    let msg = expect_error(&reply, Method::ALLOCATE, 438, Some(&c.key));
    assert_eq!(msg.realm(), Some(REALM));
    let fresh = msg.nonce().expect("438 carries a NONCE").to_owned();
    assert_ne!(fresh, old);
    assert!(h.server.allocations().next().is_none());

    c.nonce = Some(fresh);
    h.allocate(&mut c);
    // A nonce that was issued to another 5-tuple is not valid here either.
    let mut other = Client::new("192.0.2.10:50001", ALICE);
    other.nonce = c.nonce.clone();
    let tid = other.tid();
    let bytes = other.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        true,
    );
    let reply = h.transact(&other, &bytes, tid);
    expect_error(&reply, Method::ALLOCATE, 438, Some(&other.key));
}

/// TURN REST API credentials: accepted before their expiry, refused (401) after it, including
/// for an allocation that already exists when the wall clock passes the expiry.
#[test]
fn rest_credentials() {
    let mut h = Harness::new();
    let mut ok = Client::rest("192.0.2.10:50000", UNIX_NOW + 3600, "carol");
    let (_, relayed) = h.allocate(&mut ok);
    h.create_permission(&mut ok, &[peer1()]);
    assert_eq!(
        h.send_indication(&mut ok, peer1(), b"rest"),
        vec![to_peer(relayed, peer1(), b"rest")]
    );
    assert_eq!(
        h.server.allocations().next().map(|a| a.username),
        Some(ok.username.clone())
    );

    let mut expired = Client::rest("192.0.2.11:50000", UNIX_NOW - 1, "carol");
    h.challenge(
        &mut expired,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let tid = expired.tid();
    let bytes = expired.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        true,
    );
    let reply = h.transact(&expired, &bytes, tid);
    expect_error(&reply, Method::ALLOCATE, 401, None);

    // A REST password computed with another secret is refused.
    let mut forged = Client::new("192.0.2.12:50000", (ok.username.as_str(), "Zm9yZ2Vk"));
    h.challenge(
        &mut forged,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let tid = forged.tid();
    let bytes = forged.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        true,
    );
    expect_error(
        &h.transact(&forged, &bytes, tid),
        Method::ALLOCATE,
        401,
        None,
    );

    // Once the credential expires, the existing allocation can no longer be refreshed.
    h.server.set_unix_time(UNIX_NOW + 3600);
    let tid = ok.tid();
    let bytes = ok.build(tid, Method::REFRESH, &[Attribute::Lifetime(600)], true);
    expect_error(&h.transact(&ok, &bytes, tid), Method::REFRESH, 401, None);
}

/// RFC 8656 §5: a non-Allocate request on the 5-tuple with another user's credentials → 441;
/// an Allocate there → 437 (the 5-tuple is taken).
#[test]
fn other_user_on_five_tuple() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut alice);
    let mut bob = Client::new("192.0.2.10:50000", BOB);
    for (method, attrs) in [
        (Method::REFRESH, vec![Attribute::Lifetime(0)]),
        (
            Method::CREATE_PERMISSION,
            vec![Attribute::XorPeerAddress(peer1())],
        ),
        (
            Method::CHANNEL_BIND,
            vec![
                Attribute::ChannelNumber(0x4000),
                Attribute::XorPeerAddress(peer1()),
            ],
        ),
    ] {
        let reply = h.request(&mut bob, method, &attrs);
        expect_signed_error(&reply, method, 441, &bob);
    }
    let reply = h.request(
        &mut bob,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_signed_error(&reply, Method::ALLOCATE, 437, &bob);
    // Alice's allocation is untouched: no permission, no channel, still there.
    let info = h.server.allocations().next().expect("still allocated");
    assert_eq!((info.id, info.relayed), (id, relayed));
    assert!(info.permissions.is_empty() && info.channels.is_empty());
}

/// MESSAGE-INTEGRITY-SHA256 requests get MESSAGE-INTEGRITY-SHA256 responses.
#[test]
fn sha256_integrity_round_trip() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.challenge(
        &mut c,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    let tid = c.tid();
    let mut b = MessageBuilder::new(Class::Request, Method::ALLOCATE, tid);
    b.add(&Attribute::RequestedTransport(UDP))
        .add(&Attribute::Username(ALICE.0))
        .add(&Attribute::Realm(REALM))
        .add(&Attribute::Nonce(c.nonce.as_deref().expect("nonce")));
    let bytes = b.finish_with(Some(Integrity::Sha256(c.key.as_bytes())), true);
    let commands = h.client_sends(&c, &bytes);
    let [Command::CreateAllocation { id, .. }] = commands.as_slice() else {
        panic!("expected CreateAllocation, got {commands:?}");
    };
    h.server.allocation_bound(*id, h.now);
    let reply = one_reply(h.drain(), &c, tid);
    let msg = Message::decode(&reply).expect("decodes");
    assert_eq!(msg.class(), Class::Success);
    assert!(!msg.has_integrity());
    assert_eq!(msg.verify_integrity_sha256(c.key.as_bytes()), Ok(()));
}

/// Unauthenticated answers (Binding, 401, 400, 438) are budgeted in bytes per source IP,
/// relay-wide (issue 12 item 2): the conservative start balance, then silence, then refill at
/// the configured rate; authenticated requests are not affected.
#[test]
fn unauthenticated_answers_are_budgeted_in_bytes() {
    // 1000 bytes a second, bursts of 1000: a new source starts with those 1000 bytes.
    let limiter = Arc::new(UnauthLimiter::new(1_000, 1_000));
    let shared = Arc::clone(&limiter);
    let mut h = Harness::with_config(move |cfg| cfg.unauth_limiter = shared);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let binding = |c: &mut Client| {
        let tid = c.tid();
        (
            tid,
            MessageBuilder::new(Class::Request, Method::BINDING, tid).finish(None, true),
        )
    };
    let mut answered = 0;
    loop {
        let (_, bytes) = binding(&mut c);
        match h.client_sends(&c, &bytes).as_slice() {
            [Command::SendToClient { payload, .. }] => answered += payload.len(),
            [] => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    // The whole start balance and at most one answer of debt.
    assert!((1_000..1_100).contains(&answered), "{answered}");
    // Silence for Binding, 401s, 400s and 438s alike, from any port of that IP.
    for _ in 0..10 {
        let (_, bytes) = binding(&mut c);
        assert!(h.client_sends(&c, &bytes).is_empty());
        let tid = c.tid();
        let bytes = c.build(
            tid,
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(UDP)],
            false,
        );
        assert!(h.client_sends(&c, &bytes).is_empty());
        let tid = c.tid();
        let bytes = c.build(tid, Method::SEND, &[], false);
        assert!(h.client_sends(&c, &bytes).is_empty());
        // Signed, but with a nonce that is not the relay's (a replay from a spoofed source).
        let mut replay = Client::new("192.0.2.10:50009", ALICE);
        replay.nonce = Some("A".repeat(32));
        let tid = replay.tid();
        let bytes = replay.build(
            tid,
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(UDP)],
            true,
        );
        assert!(h.client_sends(&replay, &bytes).is_empty());
    }
    let mut same_ip = Client::new("192.0.2.10:50001", ALICE);
    let (_, bytes) = binding(&mut same_ip);
    assert!(h.client_sends(&same_ip, &bytes).is_empty());
    // Another source IP has its own budget, and gets a 438 for a nonce that is not ours.
    let mut other = Client::new("192.0.2.11:50000", ALICE);
    other.nonce = Some("A".repeat(32));
    let tid = other.tid();
    let bytes = other.build(
        tid,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
        true,
    );
    let reply = h.transact(&other, &bytes, tid);
    expect_signed_error(&reply, Method::ALLOCATE, 438, &other);
    let refused = limiter.refused_answers();
    assert!(refused >= 41, "{refused}");
    // Authenticated requests still work while the budget is spent: the 401 of the challenge
    // comes once a second has refilled it.
    h.advance(secs(1));
    h.allocate(&mut c);
    let (_, bytes) = binding(&mut c);
    assert_eq!(h.client_sends(&c, &bytes).len(), 1);
}
