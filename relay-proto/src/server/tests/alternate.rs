//! ALTERNATE-SERVER (RFC 8489 §10, §14.15; RFC 8656 §7.2): a draining relay, or one at its
//! relay-wide allocation cap, sends a new Allocate to an alternate of the family of the
//! address the client contacted with a signed 300 Try Alternate, never to that address itself;
//! ALTERNATE-DOMAIN (§14.16) goes along for clients over TLS.

use super::harness::*;
use crate::server::Alternates;

fn alternate_v4() -> SocketAddr {
    sa("198.51.100.7:3478")
}

fn alternate_v6() -> SocketAddr {
    sa("[2001:db8::7]:3478")
}

/// The relay's own listener (an identical fleet config names every instance), then one
/// alternate per family.
fn fleet(cfg: &mut ServerConfig) {
    cfg.relay_ips = vec![relay_v4(), relay_v6()];
    cfg.alternates = Alternates {
        servers: vec![listener(), alternate_v6(), alternate_v4()],
        domain: Some("turn.example.net".to_owned()),
    };
}

fn allocate_refused(h: &mut Harness, c: &mut Client, code: u16) -> Vec<u8> {
    let reply = h.request(c, Method::ALLOCATE, &[Attribute::RequestedTransport(UDP)]);
    expect_signed_error(&reply, Method::ALLOCATE, code, c);
    reply
}

/// Draining: the unauthenticated Allocate gets the ordinary 401 (no ALTERNATE-SERVER to an
/// unauthenticated request, RFC 8489 §10), the signed one a signed 300 naming the IPv4
/// alternate, not the listener itself; no ALTERNATE-DOMAIN over UDP.
#[test]
fn draining_sends_to_alternate_of_the_family_after_401() {
    let mut h = Harness::with_config(fleet);
    h.server.config.drain.start(h.now, None);
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
    assert!(msg.alternate_server().is_none());
    c.nonce = msg.nonce().map(str::to_owned);

    for _ in 0..8 {
        let reply = allocate_refused(&mut h, &mut c, 300);
        let msg = Message::decode(&reply).expect("decodes");
        assert_eq!(msg.error_reason(), Some("Try Alternate"));
        assert_eq!(msg.alternate_server(), Some(alternate_v4()));
        assert!(msg.alternate_domain().is_none(), "UDP client: no domain");
    }
    assert!(h.server.allocations().next().is_none());
    assert_eq!(h.quota.total(), 0);
}

/// A client that contacted the IPv6 listener is sent to the IPv6 alternate.
#[test]
fn ipv6_client_gets_ipv6_alternate() {
    let mut h = Harness::with_config(fleet);
    h.server.config.drain.start(h.now, None);
    let mut c = Client::new("[2001:db8:ffff::10]:50000", ALICE);
    c.listener = sa("[2001:db8::1]:3478");
    let reply = allocate_refused(&mut h, &mut c, 300);
    let msg = Message::decode(&reply).expect("decodes");
    assert_eq!(msg.alternate_server(), Some(alternate_v6()));
}

/// Only alternates equal to the address the client asked (or of the other family): no
/// redirect to itself, the draining 508 instead.
#[test]
fn never_redirects_to_the_address_asked() {
    let mut h = Harness::with_config(|cfg| {
        cfg.alternates.servers = vec![listener(), alternate_v6()];
    });
    h.server.config.drain.start(h.now, None);
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let reply = allocate_refused(&mut h, &mut c, 508);
    let msg = Message::decode(&reply).expect("decodes");
    assert!(msg.alternate_server().is_none());
    assert_eq!(msg.error_reason(), Some(crate::server::DRAINING_REASON));
}

/// At the relay-wide cap (not draining): 300 to the alternate when there is one, the plain 508
/// Insufficient Capacity when not; the per-user quota stays 486 (another instance would not
/// lift a user's cap).
#[test]
fn allocation_cap_sends_to_alternate() {
    let mut h = Harness::with_config(|cfg| {
        fleet(cfg);
        cfg.max_allocations = 1;
    });
    let mut first = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut first);
    let mut second = Client::new("192.0.2.11:50000", BOB);
    let reply = allocate_refused(&mut h, &mut second, 300);
    let msg = Message::decode(&reply).expect("decodes");
    assert_eq!(msg.alternate_server(), Some(alternate_v4()));
    assert_eq!(h.quota.total(), 1);

    let mut h = Harness::with_config(|cfg| cfg.max_allocations = 1);
    let mut first = Client::new("192.0.2.10:50000", ALICE);
    let mut second = Client::new("192.0.2.11:50000", BOB);
    h.allocate(&mut first);
    let reply = allocate_refused(&mut h, &mut second, 508);
    let msg = Message::decode(&reply).expect("decodes");
    assert_eq!(msg.error_reason(), Some("Insufficient Capacity"));

    let mut h = Harness::with_config(|cfg| {
        fleet(cfg);
        cfg.max_allocations_per_user = 1;
    });
    let mut first = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut first);
    let mut again = Client::new("192.0.2.12:50000", ALICE);
    allocate_refused(&mut h, &mut again, 486);
}

/// A client over TLS also gets ALTERNATE-DOMAIN, the name to check the alternate's
/// certificate against (RFC 8489 §14.16); without a configured domain it gets none.
#[test]
fn tls_client_gets_alternate_domain() {
    let mut h = Harness::with_config(fleet);
    h.server.config.drain.start(h.now, None);
    let mut c = Client::new("192.0.2.10:50000", ALICE).over(Transport::Tls);
    let reply = allocate_refused(&mut h, &mut c, 300);
    let msg = Message::decode(&reply).expect("decodes");
    assert_eq!(msg.alternate_server(), Some(alternate_v4()));
    assert_eq!(msg.alternate_domain(), Some("turn.example.net"));

    let mut h = Harness::with_config(|cfg| {
        fleet(cfg);
        cfg.alternates.domain = None;
    });
    h.server.config.drain.start(h.now, None);
    let mut c = Client::new("192.0.2.10:50000", ALICE).over(Transport::Tls);
    let reply = allocate_refused(&mut h, &mut c, 300);
    let msg = Message::decode(&reply).expect("decodes");
    assert!(msg.alternate_domain().is_none());
}

/// Several alternates of a family: redirected clients spread over all of them.
#[test]
fn several_alternates_are_all_used() {
    let others = [
        sa("198.51.100.7:3478"),
        sa("198.51.100.8:3478"),
        sa("198.51.100.9:3478"),
    ];
    let mut h = Harness::with_config(|cfg| cfg.alternates.servers = others.to_vec());
    h.server.config.drain.start(h.now, None);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..40 {
        let mut c = Client::new(&format!("192.0.2.{}:50000", 10 + i), ALICE);
        let reply = allocate_refused(&mut h, &mut c, 300);
        let msg = Message::decode(&reply).expect("decodes");
        seen.insert(msg.alternate_server().expect("ALTERNATE-SERVER"));
    }
    assert_eq!(seen, others.into_iter().collect());
}

/// A load threshold below the hard cap (`--redirect-above`): from that many allocations on,
/// new Allocates go to an alternate; without an alternate of the client's family the relay
/// still serves them (the threshold only moves clients that have somewhere to go).
#[test]
fn load_threshold_redirects_only_where_an_alternate_exists() {
    let mut h = Harness::with_config(|cfg| {
        fleet(cfg);
        cfg.redirect_above = Some(1);
    });
    let mut first = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut first);
    let mut second = Client::new("192.0.2.11:50000", BOB);
    let reply = allocate_refused(&mut h, &mut second, 300);
    let msg = Message::decode(&reply).expect("decodes");
    assert_eq!(msg.alternate_server(), Some(alternate_v4()));
    assert_eq!(h.quota.total(), 1, "the redirected Allocate took no quota");

    let mut h = Harness::with_config(|cfg| {
        cfg.alternates = Alternates {
            servers: vec![alternate_v6()],
            domain: None,
        };
        cfg.redirect_above = Some(1);
    });
    let mut first = Client::new("192.0.2.10:50000", ALICE);
    let mut second = Client::new("192.0.2.11:50000", BOB);
    h.allocate(&mut first);
    h.allocate(&mut second);
    assert_eq!(
        h.quota.total(),
        2,
        "no IPv4 alternate: served above the threshold"
    );
}
