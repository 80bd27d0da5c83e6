//! The relay's own addresses as peers (client-to-client, RFC 8656 §9): only live relayed ports
//! are destinations, host addresses learnt at runtime are not, explicit denies win.

use super::harness::*;

/// Client-to-client through the relay: a permission for the relay's address is per IP
/// (RFC 8656 §9) and allowed, but only live relayed transport addresses are destinations; any
/// other port of the relay's address (a service on the host) gets 403 on ChannelBind and its
/// Send indications are dropped.
#[test]
fn relay_address_is_a_peer_only_at_live_relayed_ports() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.10:50000", ALICE);
    let mut bob = Client::new("192.0.2.11:50000", BOB);
    let (_, relayed_a) = h.allocate(&mut alice);
    let (_, relayed_b) = h.allocate(&mut bob);
    assert_eq!(relayed_b.ip(), relay_v4());
    h.create_permission(&mut alice, &[listener()]);
    for service in [listener(), sa("203.0.113.1:22")] {
        let reply = h.request(
            &mut alice,
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(0x4000),
                Attribute::XorPeerAddress(service),
            ],
        );
        expect_signed_error(&reply, Method::CHANNEL_BIND, 403, &alice);
        assert!(h.send_indication(&mut alice, service, b"x").is_empty());
    }
    // Bob's relayed address is a peer like any other.
    h.channel_bind(&mut alice, 0x4001, relayed_b);
    let sent = h.send_indication(&mut alice, relayed_b, b"hi bob");
    assert!(
        matches!(sent.as_slice(), [Command::SendToPeer { relayed, peer, .. }]
            if *relayed == relayed_a && *peer == relayed_b),
        "{sent:?}"
    );
    let sent = h.channel_data(&alice, 0x4001, b"hi again");
    assert!(
        matches!(sent.as_slice(), [Command::SendToPeer { .. }]),
        "{sent:?}"
    );
    // Once Bob's allocation is gone, its port is just another port of the host.
    h.refresh(&mut bob, Some(0));
    assert!(h.send_indication(&mut alice, relayed_b, b"gone").is_empty());
    assert!(h.channel_data(&alice, 0x4001, b"gone").is_empty());
}

/// An address the host gains at runtime stops being a destination at once, even for a
/// permission and a channel created before.
#[test]
fn a_new_host_address_is_no_longer_a_destination() {
    let mut host = None;
    let mut h = Harness::with_config(|cfg| host = Some(cfg.policy.host_addresses().clone()));
    let host = host.expect("the policy's host addresses");
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut c);
    let target = sa("203.0.113.77:9");
    h.create_permission(&mut c, &[target]);
    h.channel_bind(&mut c, 0x4000, target);
    assert_eq!(h.send_indication(&mut c, target, b"before").len(), 1);
    host.replace([ip("203.0.113.77")]);
    assert!(h.send_indication(&mut c, target, b"after").is_empty());
    assert!(h.channel_data(&c, 0x4000, b"after").is_empty());
}

/// An operator's explicit deny covers the relay's own address too.
#[test]
fn denied_relay_address_is_403() {
    let mut h = Harness::with_config(|cfg| {
        cfg.policy.deny("203.0.113.1/32".parse().expect("cidr"));
    });
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut c);
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(listener())],
    );
    expect_signed_error(&reply, Method::CREATE_PERMISSION, 403, &c);
}

/// A client-to-client channel whose other allocation is gone leaves the fast path at the next
/// Refresh (once) instead of being re-installed towards a port that is now just a port of the
/// host.
#[test]
fn a_channel_to_a_gone_allocation_is_withdrawn_on_refresh() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.10:50000", ALICE);
    let mut bob = Client::new("192.0.2.11:50000", BOB);
    let (id_a, relayed_a) = h.allocate(&mut alice);
    let (_, relayed_b) = h.allocate(&mut bob);
    h.channel_bind(&mut alice, 0x4001, relayed_b);
    h.refresh(&mut bob, Some(0));
    assert_eq!(
        h.refresh(&mut alice, Some(600)),
        vec![delete_binding(id_a, &alice, relayed_a, relayed_b, 0x4001)]
    );
    assert_eq!(h.refresh(&mut alice, Some(600)), vec![]);
}
