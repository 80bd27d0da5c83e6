//! Usage records and `relay ctl disconnect` through the real binary (issue 13): exactly one
//! record per allocation for every way an allocation ends (expiry, Refresh 0, disconnect by id
//! and by user, a TCP client closing its connection, shutdown), the same JSON in the log and in
//! the `--usage-log` file, socket-path counters that match what was relayed, and clear errors
//! for unknown allocations and users. Loopback only; the kernel fast path's share is checked
//! in the namespace lab (`lab_relay.rs`).

mod support;

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use relay::proto::stun::{Attribute, Class, Message, Method};
use serde_json::Value;
use support::{client::Client, free_tcp_port, stream::StreamClient, Relay};

const REALM: &str = "usage.test";

/// The usage records in `path`, one JSON object per line.
fn file_records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// The usage records in a relay log (the JSON is the whole message of each such line).
fn log_records(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|line| line.contains(r#""event":"allocation_end""#))
        .filter_map(|line| line.find('{').map(|i| &line[i..]))
        .map(|json| serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}")))
        .collect()
}

/// Waits (bounded) until `path` holds `n` records.
fn wait_records(path: &Path, n: usize, within: Duration) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let records = file_records(path);
        if records.len() >= n || start.elapsed() > within {
            return records;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The record of allocation `id`; panics unless there is exactly one.
fn record_of(records: &[Value], id: u64) -> &Value {
    let found: Vec<&Value> = records.iter().filter(|r| r["allocation"] == id).collect();
    assert_eq!(found.len(), 1, "records of allocation {id}: {records:#?}");
    found[0]
}

/// The id of the allocation whose relayed address is `relayed`.
fn id_of(relay: &Relay, relayed: SocketAddr) -> u64 {
    relay
        .allocations()
        .allocations
        .iter()
        .find(|a| a.relayed == relayed.to_string())
        .map(|a| a.id)
        .unwrap_or_else(|| panic!("no allocation with relayed address {relayed}"))
}

/// A UDP client of `user` with an allocation of 600 s (the relay's default is 2 s here).
fn long_allocation(relay: &Relay, user: &str, password: &str) -> (Client, SocketAddr) {
    let mut client = Client::new(relay.listener(), REALM);
    client.login(user, password);
    let response = client.request(
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17), Attribute::Lifetime(600)],
    );
    let relayed = Message::decode(&response)
        .ok()
        .and_then(|m| m.xor_relayed_address())
        .expect("Allocate succeeds");
    (client, relayed)
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("relay-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

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

#[test]
fn one_record_per_allocation_for_every_end() {
    let dir = temp_dir("usage");
    let usage_log = dir.join("usage.jsonl");
    let tcp = SocketAddr::from(([127, 0, 0, 1], free_tcp_port("127.0.0.1")));
    let tcp_arg = tcp.to_string();
    let usage_arg = usage_log.display().to_string();
    let relay = Relay::start(&[
        "--listen",
        "127.0.0.1:0",
        "--listen-tcp",
        &tcp_arg,
        "--relay-ip",
        "127.0.0.1",
        "--realm",
        REALM,
        "--user",
        "alice:wonderland",
        "--user",
        "bob:builder",
        "--user",
        "carol:singer",
        "--allow-peer-unsafe",
        "127.0.0.5",
        "--workers",
        "2",
        "--allocation-lifetime",
        "2",
        "--usage-log",
        &usage_arg,
    ]);
    relay.wait_tcp_listening(tcp);
    let peer = UdpSocket::bind("127.0.0.5:0").expect("peer socket");
    peer.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let peer_addr = peer.local_addr().expect("peer address");
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();

    // Expiry: the default lifetime (2 s), never refreshed.
    let mut expiring = Client::new(relay.listener(), REALM);
    expiring.login("alice", "wonderland");
    let expiring_relayed = expiring.allocate();
    let expiring_id = id_of(&relay, expiring_relayed);

    // Refresh 0 after relaying 3 datagrams out and 2 back over the socket path.
    let (mut refreshed, refreshed_relayed) = long_allocation(&relay, "alice", "wonderland");
    let refreshed_id = id_of(&relay, refreshed_relayed);
    let listed = relay.allocations();
    let view = listed
        .allocations
        .iter()
        .find(|a| a.id == refreshed_id)
        .expect("listed");
    assert!(
        view.started_unix >= started_unix.saturating_sub(1)
            && view.started_unix <= started_unix + 10,
        "started_unix {} (test started {started_unix})",
        view.started_unix
    );
    assert!(
        refreshed
            .request_error(
                Method::CREATE_PERMISSION,
                &[Attribute::XorPeerAddress(peer_addr)]
            )
            .is_none(),
        "CreatePermission"
    );
    for _ in 0..3 {
        refreshed.send_indication(peer_addr, &[7u8; 100]);
        let mut buf = [0u8; 2048];
        let (n, from) = peer.recv_from(&mut buf).expect("relayed to the peer");
        assert_eq!((n, from), (100, refreshed_relayed));
    }
    let mut data_indication_bytes = 0;
    for _ in 0..2 {
        peer.send_to(&[9u8; 60], refreshed_relayed)
            .expect("peer send");
        let answer = refreshed.recv().expect("Data indication");
        let msg = Message::decode(&answer).expect("STUN");
        assert_eq!(
            (msg.class(), msg.method()),
            (Class::Indication, Method::DATA)
        );
        assert!(answer.len() > 60);
        data_indication_bytes += 60;
    }
    let refreshed_client = refreshed.socket.local_addr().expect("client address");
    refreshed.delete();

    // Disconnect by id: the client's next request finds no allocation (437).
    let (mut by_id, by_id_relayed) = long_allocation(&relay, "bob", "builder");
    let by_id_id = id_of(&relay, by_id_relayed);
    let (ok, out, err) = relay.ctl(&["disconnect", &by_id_id.to_string()]);
    assert!(ok, "disconnect {by_id_id}: {err}");
    assert!(
        out.contains(&format!("disconnected allocation(s) {by_id_id}")),
        "{out}"
    );
    assert_eq!(
        by_id.request_error(Method::REFRESH, &[Attribute::Lifetime(600)]),
        Some(437)
    );

    // Disconnect by user: both of carol's, on whichever workers they are, and nobody else's.
    let (_carol1, carol1_relayed) = long_allocation(&relay, "carol", "singer");
    let (_carol2, carol2_relayed) = long_allocation(&relay, "carol", "singer");
    let mut carol_ids = [id_of(&relay, carol1_relayed), id_of(&relay, carol2_relayed)];
    carol_ids.sort_unstable();
    let (ok, out, err) = relay.ctl(&["disconnect", "--user", "carol"]);
    assert!(ok, "disconnect --user carol: {err}");
    assert!(
        out.contains(&format!(
            "disconnected allocation(s) {}, {}",
            carol_ids[0], carol_ids[1]
        )),
        "{out}"
    );

    // Unknown allocation and user: non-zero exit, a clear message, nothing ended.
    let (ok, _, err) = relay.ctl(&["disconnect", "999999"]);
    assert!(!ok);
    assert!(err.contains("no allocation 999999"), "{err}");
    let (ok, _, err) = relay.ctl(&["disconnect", "--user", "carol"]);
    assert!(!ok);
    assert!(err.contains("no allocation of user `carol`"), "{err}");
    let (ok, _, err) = relay.ctl(&["disconnect", "--user", "nobody at all"]);
    assert!(!ok);
    assert!(
        err.contains("no allocation of user `nobody at all`"),
        "{err}"
    );
    let (ok, _, _) = relay.ctl(&["disconnect"]);
    assert!(!ok, "disconnect needs an allocation or --user");

    // A TCP client closing its connection.
    let mut closing = StreamClient::tcp(tcp, REALM);
    closing.login("alice", "wonderland");
    let closing_relayed = {
        let response = closing.request(
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(17), Attribute::Lifetime(600)],
        );
        Message::decode(&response)
            .ok()
            .and_then(|m| m.xor_relayed_address())
            .expect("TCP Allocate")
    };
    let closing_id = id_of(&relay, closing_relayed);
    let closing_client = closing.local_addr();
    drop(closing);

    // A TCP client disconnected by the operator: the relay closes its connection too.
    let mut cut = StreamClient::tcp(tcp, REALM);
    cut.login("bob", "builder");
    let cut_relayed = {
        let response = cut.request(
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(17), Attribute::Lifetime(600)],
        );
        Message::decode(&response)
            .ok()
            .and_then(|m| m.xor_relayed_address())
            .expect("TCP Allocate")
    };
    let cut_id = id_of(&relay, cut_relayed);
    let (ok, _, err) = relay.ctl(&["disconnect", &cut_id.to_string()]);
    assert!(ok, "{err}");
    assert!(
        cut.closed_within(Duration::from_secs(3)).is_some(),
        "the disconnected TCP client's connection stays open"
    );

    // Expiry has happened by now (2 s); wait for its record to be sure.
    let start = Instant::now();
    while !file_records(&usage_log)
        .iter()
        .any(|r| r["allocation"] == expiring_id)
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no expiry record"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Still live at shutdown.
    let (_live, live_relayed) = long_allocation(&relay, "bob", "builder");
    let live_id = id_of(&relay, live_relayed);
    let before_stop = wait_records(&usage_log, 7, Duration::from_secs(5));
    assert_eq!(before_stop.len(), 7, "{before_stop:#?}");
    let listener = relay.listener();
    let log = relay.stop();
    let records = file_records(&usage_log);
    assert_eq!(records.len(), 8, "{records:#?}");

    let reasons: BTreeMap<u64, &str> = records
        .iter()
        .map(|r| {
            (
                r["allocation"].as_u64().unwrap(),
                r["reason"].as_str().unwrap(),
            )
        })
        .collect();
    let expected: BTreeMap<u64, &str> = [
        (expiring_id, "expired"),
        (refreshed_id, "refresh"),
        (by_id_id, "disconnected"),
        (carol_ids[0], "disconnected"),
        (carol_ids[1], "disconnected"),
        (closing_id, "connection_closed"),
        (cut_id, "disconnected"),
        (live_id, "shutdown"),
    ]
    .into_iter()
    .collect();
    assert_eq!(reasons, expected);

    // The relayed traffic, counted once, on the socket path (no fast path here).
    let refreshed = record_of(&records, refreshed_id);
    assert_eq!(
        counters(refreshed, "socket"),
        [3, 300, 2, data_indication_bytes]
    );
    assert_eq!(counters(refreshed, "kernel"), [0; 4]);
    assert_eq!(counters(refreshed, "total"), counters(refreshed, "socket"));
    assert_eq!(refreshed["user"], "alice");
    assert_eq!(refreshed["realm"], REALM);
    assert_eq!(refreshed["transport"], "udp");
    assert_eq!(refreshed["client"], refreshed_client.to_string());
    assert_eq!(refreshed["listener"], listener.to_string());
    assert_eq!(
        refreshed["relayed"],
        serde_json::json!([refreshed_relayed.to_string()])
    );
    assert_eq!(refreshed["event"], "allocation_end");
    for record in &records {
        let (start, end) = (
            record["start_unix"].as_u64().unwrap(),
            record["end_unix"].as_u64().unwrap(),
        );
        assert!(
            start >= started_unix.saturating_sub(1) && start <= end,
            "{record}"
        );
        assert!(end <= started_unix + 120, "{record}");
        assert_eq!(
            record["duration_secs"].as_u64().unwrap(),
            end - start,
            "{record}"
        );
        assert!(record["start"].as_str().unwrap().ends_with('Z'), "{record}");
        assert_eq!(record["start"].as_str().unwrap().len(), 20, "{record}");
    }
    let expired = record_of(&records, expiring_id);
    assert!(expired["duration_secs"].as_u64().unwrap() >= 1, "{expired}");
    let closed = record_of(&records, closing_id);
    assert_eq!(closed["transport"], "tcp");
    assert_eq!(closed["client"], closing_client.to_string());
    assert_eq!(closed["listener"], tcp.to_string());
    assert_eq!(record_of(&records, carol_ids[0])["user"], "carol");

    // The log carries the same records, line for line.
    assert_eq!(log_records(&log), records, "log:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--usage-log` from the config file (TOML key `usage-log`), appended to, never truncated;
/// a path that cannot be opened stops the start with a message naming it.
#[test]
fn usage_log_from_config_appends() {
    let dir = temp_dir("usage-config");
    let usage_log = dir.join("usage.jsonl");
    std::fs::write(&usage_log, "{\"earlier\":true}\n").expect("seed file");
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"127.0.0.1:0\"]\nrelay-ip = [\"127.0.0.1\"]\nrealm = \"{REALM}\"\n\
             user = [\"alice:wonderland\"]\nusage-log = \"{}\"\n",
            usage_log.display()
        ),
    )
    .expect("config");
    let config_arg = config.display().to_string();
    let relay = Relay::start(&["--config", &config_arg]);
    let (_client, relayed) = long_allocation(&relay, "alice", "wonderland");
    let id = id_of(&relay, relayed);
    relay.stop();
    let records = file_records(&usage_log);
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(records[0]["earlier"], true);
    assert_eq!(records[1]["allocation"], id);
    assert_eq!(records[1]["reason"], "shutdown");

    let bad = dir.join("missing-dir").join("usage.jsonl");
    let output = std::process::Command::new(relay_tests::relay_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--relay-ip",
            "127.0.0.1",
            "--admin",
            "127.0.0.1:0",
            "--user",
            "alice:wonderland",
            "--usage-log",
        ])
        .arg(&bad)
        .output()
        .expect("run relay");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--usage-log"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `relay ctl disconnect --user` names a TURN REST user by its user part: a TLS and a UDP
/// allocation of two REST usernames of `dave` both end, the TLS connection is closed by the
/// relay, and the records carry the full REST usernames and each client's transport.
#[test]
fn disconnect_rest_user_over_tls_and_udp() {
    const SECRET: &str = "usage-rest-secret";
    let (pki, _) = support::tls::TestPki::installed("relay-usage");
    let dir = temp_dir("usage-tls");
    let usage_log = dir.join("usage.jsonl");
    let usage_arg = usage_log.display().to_string();
    let tls = SocketAddr::from(([127, 0, 0, 1], free_tcp_port("127.0.0.1")));
    let tls_arg = tls.to_string();
    let (cert, key) = (pki.cert_path(), pki.key_path());
    let relay = Relay::start(&[
        "--listen",
        "127.0.0.1:0",
        "--listen-tls",
        &tls_arg,
        "--tls-cert",
        cert.to_str().expect("utf-8 path"),
        "--tls-key",
        key.to_str().expect("utf-8 path"),
        "--relay-ip",
        "127.0.0.1",
        "--realm",
        REALM,
        "--auth-secret",
        SECRET,
        "--user",
        "erin:secret",
        "--workers",
        "2",
        "--usage-log",
        &usage_arg,
    ]);
    relay.wait_tcp_listening(tls);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let credential = |expiry: u64| {
        let username = format!("{expiry}:dave");
        let password =
            relay::proto::auth::rest_password(SECRET.as_bytes(), &username).expect("REST password");
        (username, password)
    };
    let (tls_user, tls_password) = credential(now + 3600);
    let (udp_user, udp_password) = credential(now + 7200);

    let mut over_tls = StreamClient::tls(tls, REALM, pki.client_config(&[]));
    over_tls.login(&tls_user, &tls_password);
    let tls_relayed = over_tls.allocate();
    let (_udp, udp_relayed) = long_allocation(&relay, &udp_user, &udp_password);
    let (_erin, erin_relayed) = long_allocation(&relay, "erin", "secret");
    let mut ids = [id_of(&relay, tls_relayed), id_of(&relay, udp_relayed)];
    ids.sort_unstable();

    let (ok, out, err) = relay.ctl(&["disconnect", "--user", "dave"]);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!(
            "disconnected allocation(s) {}, {}",
            ids[0], ids[1]
        )),
        "{out}"
    );
    assert!(
        over_tls.closed_within(Duration::from_secs(3)).is_some(),
        "the disconnected TLS client's connection stays open"
    );
    // erin is untouched.
    let left: Vec<String> = relay
        .allocations()
        .allocations
        .iter()
        .map(|a| a.relayed.clone())
        .collect();
    assert_eq!(left, vec![erin_relayed.to_string()]);

    let records = wait_records(&usage_log, 2, Duration::from_secs(5));
    assert_eq!(records.len(), 2, "{records:#?}");
    let tls_record = record_of(&records, id_of_record(&records, &tls_user));
    assert_eq!(tls_record["transport"], "tls");
    assert_eq!(tls_record["listener"], tls.to_string());
    assert_eq!(tls_record["reason"], "disconnected");
    let udp_record = record_of(&records, id_of_record(&records, &udp_user));
    assert_eq!(udp_record["transport"], "udp");
    assert_eq!(udp_record["reason"], "disconnected");
    relay.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The allocation id of the one record of `user`.
fn id_of_record(records: &[Value], user: &str) -> u64 {
    let ids: Vec<u64> = records
        .iter()
        .filter(|r| r["user"] == user)
        .filter_map(|r| r["allocation"].as_u64())
        .collect();
    assert_eq!(ids.len(), 1, "records of {user}: {records:#?}");
    ids[0]
}
