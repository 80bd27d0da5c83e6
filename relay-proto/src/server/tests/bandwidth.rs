//! Per-user bandwidth limit on the socket path (issue 12 item 3): a limited user's relayed
//! datagrams beyond the burst are dropped in both directions (ChannelData both ways, Send and
//! Data indications) and the budget refills with time; REST credentials of one user share its
//! budget; without a limit everything is forwarded.

use super::harness::*;
use crate::server::{BandwidthLedger, Direction, UserBandwidth};

/// 1000 bytes per second, bursts of 3000 bytes.
fn limited() -> (Harness, Arc<BandwidthLedger>) {
    let ledger = Arc::new(BandwidthLedger::new(1000, 3000));
    let shared = Arc::clone(&ledger);
    let h = Harness::with_config(move |config| {
        config.bandwidth = Some(shared as Arc<dyn UserBandwidth>);
    });
    (h, ledger)
}

/// How many of `n` ChannelData messages of 1000 bytes from `c` on 0x4000 reach the peer.
fn to_peer_passed(h: &mut Harness, c: &Client, n: usize) -> usize {
    let data = [7u8; 1000];
    (0..n)
        .filter(|_| !h.channel_data(c, 0x4000, &data).is_empty())
        .count()
}

/// How many of `n` datagrams of 1000 bytes from `peer` reach the client (as ChannelData or
/// Data indication).
fn to_client_passed(h: &mut Harness, relayed: SocketAddr, peer: SocketAddr, n: usize) -> usize {
    let data = [9u8; 1000];
    (0..n)
        .filter(|_| !h.peer_sends(relayed, peer, &data).is_empty())
        .count()
}

#[test]
fn channel_data_beyond_the_burst_is_dropped_both_ways_and_refills() {
    let (mut h, ledger) = limited();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);
    h.channel_bind(&mut c, 0x4000, peer1());
    // The burst (3000 bytes) covers three datagrams, whichever direction spends it.
    assert_eq!(to_peer_passed(&mut h, &c, 2), 2);
    assert_eq!(to_client_passed(&mut h, relayed, peer1(), 5), 1);
    assert_eq!(to_peer_passed(&mut h, &c, 5), 0);
    assert_eq!(ledger.dropped(Direction::ToClient), 4);
    assert_eq!(ledger.dropped(Direction::ToPeer), 5);
    assert_eq!(ledger.dropped_bytes(Direction::ToPeer), 5000);
    // Two seconds refill 2000 bytes: two more datagrams, then drops again.
    h.advance(secs(2));
    assert_eq!(to_client_passed(&mut h, relayed, peer1(), 1), 1);
    assert_eq!(to_peer_passed(&mut h, &c, 5), 1);
    // A long pause refills at most the burst.
    h.advance(secs(60));
    assert_eq!(to_peer_passed(&mut h, &c, 10), 3);
}

#[test]
fn send_and_data_indications_are_limited_too() {
    let (mut h, ledger) = limited();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);
    h.create_permission(&mut c, &[peer1()]);
    let data = [1u8; 1000];
    let sent = (0..5)
        .filter(|_| !h.send_indication(&mut c, peer1(), &data).is_empty())
        .count();
    assert_eq!(sent, 3);
    // No channel: the peer's datagrams would go as Data indications; the budget is spent.
    assert_eq!(to_client_passed(&mut h, relayed, peer1(), 3), 0);
    h.advance(secs(1));
    let commands = h.peer_sends(relayed, peer1(), &data);
    assert_eq!(data_indication(&commands, &c, peer1()), data);
    assert_eq!(ledger.dropped(Direction::ToPeer), 2);
    assert_eq!(ledger.dropped(Direction::ToClient), 3);
}

#[test]
fn rest_credentials_share_the_users_budget_and_users_do_not() {
    let (mut h, ledger) = limited();
    // Two credentials minted for the same user, and another user.
    let mut a1 = Client::rest("192.0.2.10:50000", UNIX_NOW + 600, "carol");
    let mut a2 = Client::rest("192.0.2.10:50001", UNIX_NOW + 900, "carol");
    let mut b = Client::new("192.0.2.11:50000", BOB);
    h.allocate(&mut a1);
    h.allocate(&mut a2);
    h.allocate(&mut b);
    for c in [&mut a1, &mut a2, &mut b] {
        h.channel_bind(c, 0x4000, peer1());
    }
    assert_eq!(to_peer_passed(&mut h, &a1, 2), 2);
    // The second credential gets what is left of carol's burst, not a burst of its own.
    assert_eq!(to_peer_passed(&mut h, &a2, 5), 1);
    assert_eq!(to_peer_passed(&mut h, &a1, 1), 0);
    // Bob is unaffected.
    assert_eq!(to_peer_passed(&mut h, &b, 3), 3);
    let usage = ledger.usage();
    let carol = usage.iter().find(|u| u.user == "carol").expect("carol");
    assert_eq!(carol.allocations.len(), 2);
    assert_eq!(carol.socket_offered, 8000);
    // The ledger forgets a user with its last allocation.
    h.refresh(&mut a1, Some(0));
    h.refresh(&mut a2, Some(0));
    let users: Vec<String> = ledger.usage().into_iter().map(|u| u.user).collect();
    assert_eq!(users, vec!["bob".to_owned()]);
}

#[test]
fn without_a_limit_everything_is_forwarded() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);
    h.channel_bind(&mut c, 0x4000, peer1());
    assert_eq!(to_peer_passed(&mut h, &c, 100), 100);
    assert_eq!(to_client_passed(&mut h, relayed, peer1(), 100), 100);
}
