//! Issue 13 with the kernel fast path (XDP) in the three-namespace lab: a reload whose peer
//! policy denies a live allocation's peer stops the kernel forwarding at once (the kernel
//! policy is recompiled and the permission's and channel's kernel entries are deleted), and the
//! socket path does not take over. Real traffic, counted at the peer.
//!
//! client ns 198.18.1.2 <-> relay ns 198.18.1.1 (listener) / 198.18.2.1 (relayed) <-> peer ns
//! 198.18.2.2.

mod support;

use std::{
    net::{SocketAddr, UdpSocket},
    path::PathBuf,
    sync::atomic::Ordering,
};

use relay_tests::{
    fastpath::FarEnds,
    lab::{ThreeHosts, CLIENT_IP, PEER_IP, RELAY_CLIENT_SIDE_IP, RELAY_PEER_SIDE_IP},
    require_root,
};
use support::{
    client::Client,
    echo::{round_trips, Echo},
    Relay,
};

const REALM: &str = "lab.test";

/// The config file; removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn write(&self, lab: &ThreeHosts, extra: &str) {
        let text = format!(
            "listen = [\"{RELAY_CLIENT_SIDE_IP}:3478\"]\n\
             relay-ip = [\"{RELAY_PEER_SIDE_IP}\"]\n\
             realm = \"{REALM}\"\n\
             user = [\"alice:wonderland\"]\n\
             allow-peer = [\"198.18.2.0/24\"]\n\
             fastpath = \"xdp\"\n\
             interface = [\"{}\", \"{}\"]\n{extra}",
            lab.relay_client_if, lab.relay_peer_if
        );
        std::fs::write(&self.0, text).expect("write config");
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn reload_denying_a_live_peer_stops_kernel_forwarding_at_once() {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    lab.add_static_neighbours();
    let _far = FarEnds::of(&lab);
    let config = ConfigFile(
        std::env::temp_dir().join(format!("relay-lab-reload-{}.toml", std::process::id())),
    );
    config.write(&lab, "");
    let relay_ns = lab.relay.name().to_owned();
    let path = config.0.to_str().expect("utf-8").to_owned();
    let relay = Relay::start_with(&["ip", "netns", "exec", &relay_ns], &["--config", &path], 1);
    let echo = Echo::start(&lab);
    let socket = lab
        .client
        .run_inside(|| UdpSocket::bind((CLIENT_IP, 0)).expect("client socket"));
    let server: SocketAddr = format!("{RELAY_CLIENT_SIDE_IP}:3478")
        .parse()
        .expect("addr");
    let mut client = Client::with_socket(socket, server, REALM);
    client.login("alice", "wonderland");
    client.allocate();
    client.bind_channel(0x4000, echo.addr);

    assert_eq!(round_trips(&client, 0x4000, 20, "allowed"), 20);
    let a = &relay.allocations().allocations[0];
    assert_eq!(a.path, "kernel");
    assert_eq!(a.kernel.to_peer_packets, 20, "{a:?}");

    config.write(&lab, &format!("deny-peer = [\"{PEER_IP}/32\"]\n"));
    let (ok, stdout, stderr) = relay.ctl(&["reload"]);
    assert!(ok, "relay ctl reload: {stdout}{stderr}\n{}", relay.log());
    assert!(
        stdout.contains("1 permission(s) and 1 channel(s)"),
        "{stdout}"
    );

    // Nothing reaches the peer any more, by either path.
    let before = echo.received.load(Ordering::Relaxed);
    assert_eq!(round_trips(&client, 0x4000, 10, "denied"), 0);
    assert_eq!(echo.received.load(Ordering::Relaxed), before);
    let a = &relay.allocations().allocations[0];
    assert!(a.peers.is_empty() && a.channels.is_empty(), "{a:?}");
    assert_eq!(a.kernel.to_peer_packets, 20, "kernel forwarded: {a:?}");
    assert_eq!(a.socket.to_peer_packets, 0, "socket forwarded: {a:?}");
    // The allocation itself stays (a Refresh succeeds), and a new permission is refused.
    assert_eq!(
        client.request_error(
            relay::proto::stun::Method::REFRESH,
            &[relay::proto::stun::Attribute::Lifetime(600)]
        ),
        None
    );
    assert_eq!(
        client.request_error(
            relay::proto::stun::Method::CREATE_PERMISSION,
            &[relay::proto::stun::Attribute::XorPeerAddress(echo.addr)]
        ),
        Some(403)
    );
}
