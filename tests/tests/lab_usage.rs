//! Usage records with the kernel fast path (issue 13), in the three-namespace lab: an
//! allocation whose channel went through the kernel, then through the relay socket, then was
//! disconnected by the operator gets one record whose kernel counters are exactly what the
//! kernel forwarded and whose socket counters are exactly the rest: nothing counted twice,
//! nothing lost. The record also lands in the `--usage-log` file, which the relay opened as
//! root in a directory its unprivileged self could not write to.

mod support;

use std::{net::UdpSocket, os::unix::fs::PermissionsExt, sync::atomic::Ordering};

use relay_tests::{
    fastpath::FarEnds,
    lab::{ThreeHosts, CLIENT_IP, RELAY_CLIENT_SIDE_IP, RELAY_PEER_SIDE_IP},
    require_root,
};
use serde_json::Value;
use support::{
    client::Client,
    echo::{round_trips, Echo},
    Relay,
};

const REALM: &str = "lab.test";
const PORT: &str = "3478";

fn counters(record: &Value, path: &str) -> [u64; 4] {
    let c = &record[path];
    [
        "to_peer_packets",
        "to_peer_bytes",
        "to_client_packets",
        "to_client_bytes",
    ]
    .map(|k| {
        c[k].as_u64()
            .unwrap_or_else(|| panic!("{path}.{k} in {record}"))
    })
}

fn view(c: &relay::control::PathCounters) -> [u64; 4] {
    [
        c.to_peer_packets,
        c.to_peer_bytes,
        c.to_client_packets,
        c.to_client_bytes,
    ]
}

#[test]
fn kernel_and_socket_counters_are_each_counted_once() {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    lab.add_static_neighbours();
    let _far = FarEnds::of(&lab);
    // Only root may write here: the relay (running as nobody after its start) can append only
    // because it opened the file before dropping root.
    let dir = std::env::temp_dir().join(format!("relay-lab-usage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("mode");
    let usage_log = dir.join("usage.jsonl");
    let usage_arg = usage_log.display().to_string();
    let listen = format!("{RELAY_CLIENT_SIDE_IP}:{PORT}");
    let relay_ns = lab.relay.name().to_owned();
    let (rc, rp) = (lab.relay_client_if.clone(), lab.relay_peer_if.clone());
    let relay = Relay::start_with(
        &["ip", "netns", "exec", &relay_ns],
        &[
            "--listen",
            &listen,
            "--relay-ip",
            RELAY_PEER_SIDE_IP,
            "--realm",
            REALM,
            "--user",
            "alice:wonderland",
            "--allow-peer",
            "198.18.2.0/24",
            "--fastpath",
            "xdp",
            "--interface",
            &rc,
            "--interface",
            &rp,
            "--usage-log",
            &usage_arg,
        ],
        1,
    );
    let echo = Echo::start(&lab);
    let socket = lab
        .client
        .run_inside(|| UdpSocket::bind((CLIENT_IP, 0)).expect("client socket"));
    let client_addr = socket.local_addr().expect("client address");
    let mut client = Client::with_socket(socket, listen.parse().expect("addr"), REALM);
    client.login("alice", "wonderland");
    let relayed = client.allocate();
    client.bind_channel(0x4000, echo.addr);
    let list = relay.allocations();
    assert_eq!(list.allocations.len(), 1);
    let allocation = &list.allocations[0];
    assert_eq!(allocation.path, "kernel");
    let id = allocation.id;

    // 100 through the kernel, 30 through the relay socket, 50 through the kernel again.
    assert_eq!(round_trips(&client, 0x4000, 100, "kernel"), 100);
    let (ok, _, err) = relay.ctl(&["fastpath", "off", &id.to_string()]);
    assert!(ok, "{err}");
    assert_eq!(round_trips(&client, 0x4000, 30, "socket"), 30);
    let (ok, _, err) = relay.ctl(&["fastpath", "on", &id.to_string()]);
    assert!(ok, "{err}");
    assert_eq!(round_trips(&client, 0x4000, 50, "again!"), 50);
    assert_eq!(echo.received.load(Ordering::Relaxed), 180);
    let last = relay.allocations().allocations[0].clone();
    assert_eq!(
        (last.kernel.to_peer_packets, last.kernel.to_client_packets),
        (150, 150)
    );

    let (ok, out, err) = relay.ctl(&["disconnect", &id.to_string()]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("disconnected allocation(s) {id}")),
        "{out}"
    );
    // The kernel forwards nothing more for it.
    assert_eq!(round_trips(&client, 0x4000, 5, "gone"), 0);
    assert_eq!(echo.received.load(Ordering::Relaxed), 180);

    let log = relay.stop();
    let text = std::fs::read_to_string(&usage_log).expect("usage log written");
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(records.len(), 1, "{text}\nlog:\n{log}");
    let record = &records[0];
    assert_eq!(record["allocation"], id);
    assert_eq!(record["reason"], "disconnected");
    assert_eq!(record["client"], client_addr.to_string());
    assert_eq!(record["listener"], listen);
    assert_eq!(record["relayed"], serde_json::json!([relayed.to_string()]));
    // Exactly what the kernel forwarded (the last listing: nothing moved since), and exactly
    // the 30 round trips on the socket path; both paths count the 12-byte payloads, not the
    // ChannelData framing.
    assert_eq!(counters(record, "kernel"), view(&last.kernel), "{record}");
    assert_eq!(counters(record, "kernel"), [150, 150 * 12, 150, 150 * 12]);
    assert_eq!(
        counters(record, "socket"),
        [30, 30 * 12, 30, 30 * 12],
        "{record}"
    );
    assert_eq!(counters(record, "socket"), view(&last.socket), "{record}");
    let total = counters(record, "total");
    assert_eq!(total[0], 180, "every datagram the peer received, once");
    assert_eq!(total[2], 180);
    assert!(log.contains(&text.lines().next().unwrap_or_default().to_owned()));
    let _ = std::fs::remove_dir_all(&dir);
}
