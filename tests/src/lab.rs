//! Lab topologies from shared/docs/test-lab.md.

use crate::{unique_suffix, Netns};

/// Two hosts on one veth pair: `client` (198.18.1.2/24 on `client_if`) and `relay`
/// (198.18.1.1/24 on `relay_if`).
pub struct TwoHosts {
    pub client: Netns,
    pub relay: Netns,
    pub client_if: String,
    pub relay_if: String,
}

pub const CLIENT_IP: &str = "198.18.1.2";
pub const RELAY_CLIENT_SIDE_IP: &str = "198.18.1.1";

impl TwoHosts {
    pub fn new() -> Self {
        let client = Netns::new("rtc");
        let relay = Netns::new("rtr");
        let suffix = unique_suffix();
        let client_if = format!("c{suffix}");
        let relay_if = format!("r{suffix}");
        assert!(relay_if.len() <= 15, "interface name too long: {relay_if}");
        // Create both ends inside the client namespace, then move one: no device ever sits in
        // the test runner's own namespace.
        client.ip(&[
            "link", "add", &client_if, "type", "veth", "peer", "name", &relay_if,
        ]);
        client.ip(&["link", "set", &relay_if, "netns", relay.name()]);
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", &client_if]);
        relay.ip(&[
            "addr",
            "add",
            &format!("{RELAY_CLIENT_SIDE_IP}/24"),
            "dev",
            &relay_if,
        ]);
        client.ip(&["link", "set", &client_if, "up"]);
        relay.ip(&["link", "set", &relay_if, "up"]);
        Self {
            client,
            relay,
            client_if,
            relay_if,
        }
    }
}

impl Default for TwoHosts {
    fn default() -> Self {
        Self::new()
    }
}
