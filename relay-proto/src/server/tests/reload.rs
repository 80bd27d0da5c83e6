//! Runtime reconfiguration (`Server::reconfigure`, what `relay ctl reload` and SIGHUP send every
//! worker): a tightened peer policy withdraws live permissions, channels and their fast-path
//! entries at once (RFC 8656 §9, §12); credentials are checked per request (RFC 8489 §9.2.4),
//! so kept users go on, removed ones get 401 and REST secrets rotate; caps apply to the next
//! Allocate.

use super::harness::*;
use crate::server::{Reconfigure, ReconfigureReport};

/// The harness's credentials, policy and caps, as a reload would send them.
fn same_as_base() -> Reconfigure {
    let base = base_config();
    Reconfigure {
        credentials: base.credentials,
        policy: base.policy,
        max_allocations: base.max_allocations,
        max_allocations_per_user: base.max_allocations_per_user,
    }
}

/// A REST client whose password comes from `secret` (not the harness's REST_SECRET).
fn rest_client(addr: &str, user: &str, secret: &str) -> Client {
    let username = format!("{}:{user}", UNIX_NOW + 3600);
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret.as_bytes()).expect("hmac");
    mac.update(username.as_bytes());
    let password = STANDARD.encode(mac.finalize().into_bytes());
    Client::new(addr, (username.as_str(), password.as_str()))
}

fn credentials(users: &[(&str, &str)], secrets: &[&str]) -> Credentials {
    let mut c = Credentials::new(REALM);
    for (name, password) in users {
        c.add_user(name, password);
    }
    for secret in secrets {
        c.add_rest_secret(secret);
    }
    c
}

/// RFC 8656 §9, §12: a permission the new policy forbids is gone at once, with its channel
/// (kernel entry deleted, number reserved) and its own kernel entry; Send indications,
/// ChannelData and peer data to and from that peer stop, a new CreatePermission for it gets
/// 403, while another peer's permission on the same allocation keeps relaying.
#[test]
fn tightened_policy_revokes_live_permissions_channels_and_kernel_entries() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (id, relayed) = h.allocate(&mut c);
    h.create_permission(&mut c, &[peer1(), peer2()]);
    h.channel_bind(&mut c, 0x4000, peer1());
    assert_eq!(
        h.channel_data(&c, 0x4000, b"before"),
        vec![to_peer(relayed, peer1(), b"before")]
    );
    h.permissions.clear();

    let mut update = same_as_base();
    update
        .policy
        .deny(format!("{}/32", peer1().ip()).parse().expect("cidr"));
    let report = h.server.reconfigure(update, h.now);
    assert_eq!(
        report,
        ReconfigureReport {
            permissions_revoked: 1,
            channels_revoked: 1,
            allocations_without_credentials: 0,
        }
    );
    assert_eq!(
        h.drain(),
        vec![delete_binding(id, &c, relayed, peer1(), 0x4000)],
        "the channel leaves the fast path"
    );
    assert_eq!(
        h.permissions,
        vec![Command::DeletePermission {
            id,
            relayed,
            peer_ip: peer1().ip(),
        }],
        "the permission leaves the fast path"
    );
    let info = h.server.allocations().next().expect("allocation kept");
    assert_eq!(info.permissions, vec![peer2().ip()]);
    assert!(info.channels.is_empty(), "{:?}", info.channels);

    // Nothing to or from the forbidden peer on the socket path any more.
    assert!(h.channel_data(&c, 0x4000, b"after").is_empty());
    assert!(h.send_indication(&mut c, peer1(), b"after").is_empty());
    assert!(h.peer_sends(relayed, peer1(), b"after").is_empty());
    let reply = h.request(
        &mut c,
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer1())],
    );
    expect_error(&reply, Method::CREATE_PERMISSION, 403, Some(&c.key));

    // The allowed peer keeps relaying both ways.
    assert_eq!(
        h.send_indication(&mut c, peer2(), b"still"),
        vec![to_peer(relayed, peer2(), b"still")]
    );
    let commands = h.peer_sends(relayed, peer2(), b"back");
    assert_eq!(data_indication(&commands, &c, peer2()), b"back");

    // The withdrawn channel number stays reserved for its cooldown (RFC 8656 §12: 400 for
    // another peer), then is free again; a new channel to the allowed peer works meanwhile.
    let peer3 = sa("9.9.9.9:9000");
    let reply = h.request(
        &mut c,
        Method::CHANNEL_BIND,
        &[
            Attribute::ChannelNumber(0x4000),
            Attribute::XorPeerAddress(peer3),
        ],
    );
    expect_error(&reply, Method::CHANNEL_BIND, 400, Some(&c.key));
    h.channel_bind(&mut c, 0x4001, peer2());
    h.advance(CHANNEL_COOLDOWN + secs(1));
    h.tick();
    h.refresh(&mut c, Some(600));
    h.channel_bind(&mut c, 0x4000, peer3);
}

/// A reload with an unchanged policy withdraws nothing and emits nothing.
#[test]
fn unchanged_reload_is_a_no_op_for_live_allocations() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);
    h.channel_bind(&mut c, 0x4000, peer1());
    h.permissions.clear();
    let report = h.server.reconfigure(same_as_base(), h.now);
    assert_eq!(report, ReconfigureReport::default());
    assert!(h.drain().is_empty());
    assert!(h.permissions.is_empty());
    assert_eq!(
        h.channel_data(&c, 0x4000, b"x"),
        vec![to_peer(relayed, peer1(), b"x")]
    );
}

/// RFC 8489 §9.2.4: every request is checked against the current credentials. A user the
/// reload keeps goes on refreshing; a removed user's next request gets 401 (its allocation
/// keeps relaying until it expires, then gives its quota back under the name it took it).
#[test]
fn removed_user_gets_401_and_kept_user_goes_on() {
    let mut h = Harness::new();
    let mut alice = Client::new("192.0.2.10:50000", ALICE);
    let mut bob = Client::new("192.0.2.11:50000", BOB);
    h.allocate(&mut alice);
    let (_, bob_relayed) = h.allocate(&mut bob);
    h.create_permission(&mut bob, &[peer1()]);
    assert_eq!(h.quota.of_user(BOB.0), 1);

    let mut update = same_as_base();
    update.credentials = credentials(&[ALICE], &[REST_SECRET]);
    let report = h.server.reconfigure(update, h.now);
    assert_eq!(report.allocations_without_credentials, 1);
    assert_eq!(report.permissions_revoked, 0);

    h.refresh(&mut alice, Some(600));
    let tid = bob.tid();
    let bytes = bob.build(tid, Method::REFRESH, &[Attribute::Lifetime(600)], true);
    let reply = h.transact(&bob, &bytes, tid);
    expect_error(&reply, Method::REFRESH, 401, None);
    // Unauthenticated data still flows until the allocation ends.
    let commands = h.peer_sends(bob_relayed, peer1(), b"late");
    assert_eq!(data_indication(&commands, &bob, peer1()), b"late");

    // Bob's allocation expires with its lifetime and its quota is given back.
    h.advance(secs(601));
    h.tick();
    assert_eq!(h.quota.of_user(BOB.0), 0);
    assert!(h.server.allocations().all(|a| a.username == ALICE.0));
    // A user added by a reload can allocate at once.
    let mut update = same_as_base();
    update.credentials = credentials(&[ALICE, ("carol", "carol-password")], &[]);
    h.server.reconfigure(update, h.now);
    let mut carol = Client::new("192.0.2.12:50000", ("carol", "carol-password"));
    h.allocate(&mut carol);
}

/// TURN REST secret rotation: with the old and the new secret configured both credentials are
/// accepted; once the old one is removed its credentials get 401 and the new ones go on.
#[test]
fn rest_secret_rotation_accepts_both_then_only_the_new() {
    let mut h = Harness::new();
    let mut old = rest_client("192.0.2.20:50000", "dave", REST_SECRET);
    h.allocate(&mut old);

    let mut update = same_as_base();
    update.credentials = credentials(&[ALICE, BOB], &[REST_SECRET, "new-secret"]);
    h.server.reconfigure(update, h.now);
    let mut new = rest_client("192.0.2.21:50000", "erin", "new-secret");
    h.allocate(&mut new);
    h.refresh(&mut old, Some(600));

    let mut update = same_as_base();
    update.credentials = credentials(&[ALICE, BOB], &["new-secret"]);
    let report = h.server.reconfigure(update, h.now);
    assert_eq!(report.allocations_without_credentials, 1);
    h.refresh(&mut new, Some(600));
    let tid = old.tid();
    let bytes = old.build(tid, Method::REFRESH, &[Attribute::Lifetime(600)], true);
    let reply = h.transact(&old, &bytes, tid);
    expect_error(&reply, Method::REFRESH, 401, None);
}

/// Lowered caps apply to the next Allocate (486); allocations above them are kept.
#[test]
fn lowered_caps_apply_to_the_next_allocate() {
    let mut h = Harness::new();
    let mut first = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut first);
    let mut update = same_as_base();
    update.max_allocations_per_user = 1;
    h.server.reconfigure(update, h.now);
    let mut second = Client::new("192.0.2.10:50001", ALICE);
    let reply = h.request(
        &mut second,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(UDP)],
    );
    expect_error(&reply, Method::ALLOCATE, 486, Some(&second.key));
    h.refresh(&mut first, Some(600));
    assert_eq!(h.quota.of_user(ALICE.0), 1);
}

/// The quota is given back under the name it was taken under, even if a reload changes how
/// a username maps to a quota name (a static user named like a REST username).
#[test]
fn quota_is_released_under_the_name_it_was_taken() {
    let rest_like = ("1700009999:frank", "frank-password");
    let mut h = Harness::with_config(|config| {
        config.credentials.add_user(rest_like.0, rest_like.1);
    });
    let mut c = Client::new("192.0.2.30:50000", rest_like);
    h.allocate(&mut c);
    // As a static user it counts under its full name.
    assert_eq!(h.quota.of_user(rest_like.0), 1);
    let mut update = same_as_base();
    update.credentials = credentials(&[ALICE, BOB], &[REST_SECRET]);
    h.server.reconfigure(update, h.now);
    h.advance(secs(601));
    h.tick();
    assert_eq!(h.quota.of_user(rest_like.0), 0);
    assert_eq!(h.quota.of_user("frank"), 0);
    assert_eq!(h.quota.total(), 0);
}
