//! Issue 12 item 6 through the real binary: `--allow-peer` CIDRs never open the
//! non-overridable tier (loopback, link-local with the metadata service, unspecified,
//! multicast, broadcast); only `--allow-peer-unsafe ADDR` names one exact address of it.

mod support;

use relay::proto::stun::{Attribute, Method};
use support::{
    client::{error_code, Client},
    Relay,
};

const REALM: &str = "relay.local";

fn relay_with(extra: &[&str]) -> Relay {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--realm",
        REALM,
        "--user",
        "alice:wonderland",
    ];
    args.extend_from_slice(extra);
    Relay::start(&args)
}

/// The CreatePermission answer's error code for `peer` (None: success).
fn permission(client: &mut Client, peer: &str) -> Option<u16> {
    let peer = peer.parse().expect("socket address");
    let response = client.request(
        Method::CREATE_PERMISSION,
        &[Attribute::XorPeerAddress(peer)],
    );
    error_code(&response)
}

#[test]
fn allow_peer_everything_still_denies_the_tier_and_unsafe_names_one_address() {
    let relay = relay_with(&[
        "--allow-peer",
        "0.0.0.0/0",
        "--allow-peer-unsafe",
        "127.0.0.5",
    ]);
    let mut client = Client::new(relay.listener(), REALM);
    client.login("alice", "wonderland");
    client.allocate();
    // Overridable defaults are opened by the CIDR.
    for peer in ["8.8.8.8:9", "10.0.0.1:9", "192.168.1.1:9", "198.18.0.1:9"] {
        assert_eq!(permission(&mut client, peer), None, "{peer}");
    }
    // The tier is not.
    for peer in [
        "169.254.169.254:80",
        "127.0.0.2:9",
        "127.0.0.6:9",
        "0.0.0.0:9",
        "224.0.0.1:9",
        "255.255.255.255:9",
    ] {
        assert_eq!(permission(&mut client, peer), Some(403), "{peer}");
    }
    // (127.0.0.1 is the relay address: a permission for it exists for client-to-client
    // relaying, and only live relayed ports of it are ever reached; the interop tests cover
    // that.) Exactly the named address is allowed.
    assert_eq!(permission(&mut client, "127.0.0.5:9"), None);
}
