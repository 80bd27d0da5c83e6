//! TURN over TCP and TLS (issue 11, RFC 8656 §5): `relay serve --listen-tcp/--listen-tls`
//! against real third-party clients (coturn's `turnutils_uclient`, aioice) and the tests' own
//! stream client, on loopback and through the namespace lab with the XDP fast path on.
//!
//! Certificates come from a throw-away CA generated per test (rcgen). Peers live on 127.0.0.2
//! (`--allow-peer-unsafe 127.0.0.2`) on loopback, and on 198.18.2.2 in the lab.

mod support;

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use relay::proto::{
    auth::rest_password,
    stun::{Attribute, Class, Method},
};
use relay_tests::{
    fastpath::FarEnds,
    lab::{
        ThreeHosts, CLIENT_IP, PEER_IP as LAB_PEER_IP, RELAY_CLIENT_SIDE_IP, RELAY_PEER_SIDE_IP,
    },
    require_root,
};
use serde_json::Value;
use support::{
    client::Client,
    echo_peer, free_tcp_port, free_udp_port, run_aioice_over,
    stream::{StreamClient, StreamRelay},
    tls::TestPki,
    uclient_stream, AioiceTransport, Relay,
};

const PEER_IP: &str = "127.0.0.2";
const REALM: &str = "relay.local";
const SECRET: &str = "stream-rest-secret";

/// A relay on loopback with a UDP, a TCP and a TLS listener (the certificate from `pki`).
type Streams = StreamRelay;

fn relay_with(pki: &TestPki, extra: &[&str]) -> Streams {
    StreamRelay::start(pki, extra)
}

/// A UDP peer on 127.0.0.2 the tests read and answer themselves.
fn udp_peer() -> (UdpSocket, SocketAddr) {
    let peer = UdpSocket::bind((PEER_IP, 0)).expect("peer socket");
    peer.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let addr = peer.local_addr().expect("peer addr");
    (peer, addr)
}

/// `relay ctl allocations --json` as plain JSON (the transport field is new, so it is read
/// without the relay's own types).
fn allocations_json(relay: &Relay) -> Vec<Value> {
    let (ok, stdout, stderr) = relay.ctl(&["allocations", "--json"]);
    assert!(ok, "relay ctl allocations: {stderr}");
    let list: Value = serde_json::from_str(&stdout).expect("allocation JSON");
    list["allocations"]
        .as_array()
        .unwrap_or_else(|| panic!("no allocations array in {stdout}"))
        .clone()
}

/// The allocation of the client at `client`, from `relay ctl allocations --json`.
fn allocation_of(list: &[Value], client: SocketAddr) -> Value {
    list.iter()
        .find(|a| a["client"].as_str() == Some(&client.to_string()))
        .unwrap_or_else(|| panic!("no allocation for {client} in {list:#?}"))
        .clone()
}

/// A TURN REST credential for `user`, valid for an hour.
fn rest_credential(user: &str) -> (String, String) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let username = format!("{}:{user}", now + 3600);
    let password = rest_password(SECRET.as_bytes(), &username).expect("hmac");
    (username, password)
}

/// uclient against the echo peer on 127.0.0.2:`peer_port` with 4 sessions x 100 messages of
/// 200 B, 5 ms apart, plus `extra` flags; asserts zero loss. Returns the messages sent (over a
/// repeated TLS run too).
fn uclient_loopback(
    relay: &Relay,
    server: SocketAddr,
    peer_port: u16,
    extra: &[&str],
    label: &str,
) -> u64 {
    let port = server.port().to_string();
    let peer_port = peer_port.to_string();
    let mut args = vec![
        "-u",
        "alice",
        "-w",
        "wonderland",
        "-e",
        PEER_IP,
        "-r",
        &peer_port,
        "-n",
        "100",
        "-m",
        "4",
        "-l",
        "200",
        "-z",
        "5",
        "-c",
        "-p",
        &port,
    ];
    args.extend_from_slice(extra);
    args.push("127.0.0.1");
    let (report, sent) = uclient_stream(&[], &args);
    assert_eq!(
        report.lost,
        Some(0),
        "{label}: {}\n{}",
        report.output,
        relay.log()
    );
    assert_eq!(
        (report.sent, report.received),
        (400, 400),
        "{label}: {}",
        report.output
    );
    sent
}

/// coturn's client over TCP (`-t`) and TLS (`-t -S`, the certificate checked against the test
/// CA with `-E`), with ChannelData and with Send indications (`-s`), four sessions each, all
/// four runs at once: nothing lost, everything on the socket path, and every connection and
/// allocation gone afterwards.
#[test]
fn uclient_over_tcp_and_tls_with_channel_data_and_send_indications_loses_nothing() {
    let (pki, _) = TestPki::installed("relay-uclient");
    // uclient binds channels past 0x4FFF (RFC 5766's range), as in the UDP interop tests.
    let s = relay_with(&pki, &["--legacy-channels"]);
    let peer_port = free_udp_port(PEER_IP);
    let _peer = echo_peer(&[], PEER_IP, peer_port);
    let ca = pki.ca_path();
    let ca = ca.to_str().expect("utf-8 path");
    let runs: [(&str, SocketAddr, Vec<&str>); 4] = [
        ("tcp channel data", s.tcp, vec!["-t"]),
        ("tcp send indications", s.tcp, vec!["-t", "-s"]),
        ("tls channel data", s.tls, vec!["-t", "-S", "-E", ca]),
        (
            "tls send indications",
            s.tls,
            vec!["-t", "-S", "-E", ca, "-s"],
        ),
    ];
    let sent = std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .iter()
            .map(|(label, server, extra)| {
                let relay = &s.relay;
                scope.spawn(move || uclient_loopback(relay, *server, peer_port, extra, label))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("uclient run"))
            .sum::<u64>()
    });
    let relay = &s.relay;
    // Every message each way went through relay sockets (4 runs x 400, plus a repeated run).
    assert_eq!(
        relay.metric("relay_relayed_packets_total{path=\"socket\",direction=\"to_peer\"}"),
        sent
    );
    assert_eq!(
        relay.metric("relay_relayed_packets_total{path=\"socket\",direction=\"to_client\"}"),
        sent
    );
    assert_eq!(relay.metric("relay_stream_send_drops_total"), 0);
    // uclient closed its connections: they and their allocations are gone.
    for transport in ["tcp", "tls"] {
        let gauge = format!("relay_connections{{transport=\"{transport}\"}}");
        assert_eq!(
            relay.wait_metric(&gauge, 0, Duration::from_secs(5)),
            0,
            "{gauge}\n{}",
            relay.log()
        );
        let closed = relay.metric_sum(
            "relay_connections_closed_total",
            &[&format!("transport=\"{transport}\"")],
        );
        assert!(closed >= 8, "{transport}: only {closed} connections closed");
    }
    assert_eq!(
        relay.wait_metric("relay_allocations", 0, Duration::from_secs(5)),
        0
    );
    assert_eq!(relay.allocations().allocations.len(), 0);
}

/// The tests' own client over TCP and TLS next to a UDP one: each allocation shows its client
/// transport in `relay ctl allocations` (table and JSON) and in the metrics, relays to a UDP
/// peer both ways (ChannelData padded on the stream, Send/Data indications), and ends when its
/// connection closes (RFC 8656 §5): the relayed port is free again. TLS 1.2 and 1.3 both
/// handshake; REQUESTED-TRANSPORT 6 over TCP gets 442.
#[test]
fn stream_allocations_show_their_transport_relay_both_ways_and_end_with_the_connection() {
    let mut pki = TestPki::new();
    let leaf = pki.leaf("relay-ctl");
    pki.install(&leaf);
    let s = relay_with(&pki, &[]);
    let relay = &s.relay;
    let (peer, peer_addr) = udp_peer();

    for (version, name) in [
        (&rustls::version::TLS12, "TLSv1_2"),
        (&rustls::version::TLS13, "TLSv1_3"),
    ] {
        let mut client = StreamClient::tls(s.tls, REALM, pki.client_config(&[version]));
        assert_eq!(
            client.tls_version().map(|v| format!("{v:?}")),
            Some(name.to_owned())
        );
        assert_eq!(
            client.peer_certificate().as_ref(),
            Some(&leaf.der),
            "{name}"
        );
        assert_eq!(client.binding(), Ok(client.local_addr()), "{name}");
    }

    let mut tcp = StreamClient::tcp(s.tcp, REALM);
    tcp.login("alice", "wonderland");
    assert_eq!(
        tcp.outcome(Method::ALLOCATE, &[Attribute::RequestedTransport(6)]),
        (Class::Error, Some(442)),
        "RFC 6062 TCP relaying is not offered"
    );
    let tcp_relayed = tcp.allocate();
    let mut tls = StreamClient::tls(s.tls, REALM, pki.client_config(&[]));
    tls.login("alice", "wonderland");
    let tls_relayed = tls.allocate();
    let mut udp = Client::new(relay.listeners[0], REALM);
    udp.login("alice", "wonderland");
    let udp_relayed = udp.allocate();

    // The admin view names each allocation's client transport.
    let list = allocations_json(relay);
    assert_eq!(list.len(), 3, "{list:#?}");
    for (client, relayed, transport) in [
        (tcp.local_addr(), tcp_relayed, "tcp"),
        (tls.local_addr(), tls_relayed, "tls"),
        (udp.socket.local_addr().expect("addr"), udp_relayed, "udp"),
    ] {
        let a = allocation_of(&list, client);
        assert_eq!(a["transport"], transport, "{a:#}");
        assert_eq!(a["relayed"], relayed.to_string(), "{a:#}");
        assert_eq!(a["path"], "socket", "{a:#}");
    }
    let (ok, table, stderr) = relay.ctl(&["allocations"]);
    assert!(ok, "{stderr}");
    assert!(table.contains("TRANSPORT"), "{table}");
    for (relayed, transport) in [
        (tcp_relayed, "tcp"),
        (tls_relayed, "tls"),
        (udp_relayed, "udp"),
    ] {
        let row = table
            .lines()
            .find(|l| l.contains(&relayed.to_string()))
            .unwrap_or_else(|| panic!("no row for {relayed}:\n{table}"));
        assert!(
            row.split_whitespace().any(|w| w == transport),
            "{transport} missing in {row}"
        );
    }
    for transport in ["udp", "tcp", "tls"] {
        assert_eq!(
            relay.metric(&format!(
                "relay_allocations_by_transport{{transport=\"{transport}\"}}"
            )),
            1,
            "{transport}"
        );
    }
    // Three open TLS connections (the two version probes closed already, or about to).
    assert_eq!(
        relay.metric("relay_connections{transport=\"tcp\"}"),
        1,
        "tcp connections"
    );
    assert_eq!(
        relay.wait_metric(
            "relay_connections{transport=\"tls\"}",
            1,
            Duration::from_secs(5)
        ),
        1,
        "tls connections"
    );

    // TCP: a channel to the peer; ChannelData both ways, padded to 4 on the stream (a 5-byte
    // payload makes 12 bytes: a wrong padding would break the Binding that follows).
    tcp.permit(peer_addr);
    tcp.bind_channel(0x4001, peer_addr);
    tcp.send_channel_data(0x4001, b"tcp->peer").expect("send");
    let mut buf = [0u8; 2048];
    let (n, from) = peer
        .recv_from(&mut buf)
        .expect("ChannelData reached the peer");
    assert_eq!((&buf[..n], from), (&b"tcp->peer"[..], tcp_relayed));
    peer.send_to(b"hello", tcp_relayed).expect("peer sends");
    assert_eq!(tcp.next_data(), Ok((0x4001, b"hello".to_vec())));
    assert_eq!(
        tcp.binding(),
        Ok(tcp.local_addr()),
        "framing after odd ChannelData"
    );

    // TLS: Send indication out, Data indication back.
    tls.permit(peer_addr);
    tls.send_indication(peer_addr, b"tls->peer").expect("send");
    let (n, from) = peer
        .recv_from(&mut buf)
        .expect("Send indication reached the peer");
    assert_eq!((&buf[..n], from), (&b"tls->peer"[..], tls_relayed));
    peer.send_to(b"back over tls", tls_relayed)
        .expect("peer sends");
    assert_eq!(tls.next_data(), Ok((0, b"back over tls".to_vec())));

    // Closing a connection ends its allocation, and only its own.
    drop(tcp);
    assert_eq!(
        relay.wait_metric("relay_allocations", 2, Duration::from_secs(5)),
        2,
        "{}",
        relay.log()
    );
    UdpSocket::bind(tcp_relayed)
        .unwrap_or_else(|e| panic!("{tcp_relayed} still held after its connection closed: {e}"));
    drop(tls);
    assert_eq!(
        relay.wait_metric("relay_allocations", 1, Duration::from_secs(5)),
        1
    );
    UdpSocket::bind(tls_relayed)
        .unwrap_or_else(|e| panic!("{tls_relayed} still held after its connection closed: {e}"));
    let remaining = allocations_json(relay);
    assert_eq!(remaining.len(), 1);
    assert_eq!(remaining[0]["transport"], "udp");
    for transport in ["tcp", "tls"] {
        let gauge = format!("relay_connections{{transport=\"{transport}\"}}");
        assert_eq!(relay.wait_metric(&gauge, 0, Duration::from_secs(5)), 0);
        assert_eq!(
            relay.metric(&format!(
                "relay_allocations_by_transport{{transport=\"{transport}\"}}"
            )),
            0
        );
    }
    udp.delete();
    assert_eq!(relay.metric("relay_allocations"), 0);
}

/// aioice's TURN client over TCP and over TLS (certificate checked against the test CA and the
/// relay's IP address), with a long-term credential and with a TURN REST credential: Allocate,
/// permission, Send/Data indications, ChannelBind and ChannelData, Refresh(0), 437 after it,
/// and 401 for a wrong password.
#[test]
fn aioice_over_tcp_and_tls_with_long_term_and_rest_credentials() {
    let (pki, _) = TestPki::installed("relay-aioice");
    let s = relay_with(&pki, &["--auth-secret", SECRET]);
    let ca = pki.ca_path();
    let (rest_user, rest_password) = rest_credential("bob");
    for (server, transport) in [
        (s.tcp, AioiceTransport::Tcp),
        (s.tls, AioiceTransport::Tls(&ca)),
    ] {
        run_aioice_over(&[], server, ("alice", "wonderland"), PEER_IP, transport);
        run_aioice_over(
            &[],
            server,
            (&rest_user, &rest_password),
            PEER_IP,
            transport,
        );
    }
    assert_eq!(
        s.relay
            .wait_metric("relay_allocations", 0, Duration::from_secs(5)),
        0
    );
    for transport in ["tcp", "tls"] {
        let gauge = format!("relay_connections{{transport=\"{transport}\"}}");
        assert_eq!(s.relay.wait_metric(&gauge, 0, Duration::from_secs(5)), 0);
    }
}

/// Certificate reload (`relay ctl reload` and SIGHUP): new handshakes get the new certificate,
/// a TLS client connected before keeps its connection and allocation (it refreshes and relays
/// on it); a broken certificate file or a key that does not match keeps the old certificate,
/// and `relay ctl reload` says why with a failure exit.
#[test]
fn certificate_reload_keeps_open_connections_and_new_handshakes_get_the_new_certificate() {
    let mut pki = TestPki::new();
    let first = pki.leaf("relay-first");
    pki.install(&first);
    let mut s = relay_with(&pki, &[]);
    let (peer, peer_addr) = udp_peer();
    let config = pki.client_config(&[]);
    let new_certificate = |config: &std::sync::Arc<rustls::ClientConfig>| {
        let client = StreamClient::tls(s.tls, REALM, config.clone());
        client.peer_certificate().expect("a certificate")
    };

    let mut old = StreamClient::tls(s.tls, REALM, config.clone());
    assert_eq!(old.peer_certificate(), Some(first.der.clone()));
    old.login("alice", "wonderland");
    let relayed = old.allocate();
    old.permit(peer_addr);
    // The old connection relays both ways: a Send indication out, a Data indication back.
    let round_trip = |client: &mut StreamClient, tag: &str| {
        client
            .send_indication(peer_addr, tag.as_bytes())
            .expect("send on the old connection");
        let mut buf = [0u8; 512];
        let (n, from) = peer.recv_from(&mut buf).expect("relayed to the peer");
        assert_eq!((&buf[..n], from), (tag.as_bytes(), relayed), "{tag}");
        peer.send_to(tag.as_bytes(), relayed).expect("peer answers");
        assert_eq!(
            client.next_data(),
            Ok((0, tag.as_bytes().to_vec())),
            "{tag}"
        );
    };
    round_trip(&mut old, "before any reload");

    // `relay ctl reload` with a new certificate and key.
    let second = pki.leaf("relay-second");
    pki.install(&second);
    let (ok, stdout, stderr) = s.relay.ctl(&["reload"]);
    assert!(ok, "relay ctl reload: {stdout}{stderr}\n{}", s.relay.log());
    assert_eq!(
        new_certificate(&config),
        second.der,
        "a handshake after the reload still got the old certificate"
    );
    assert_eq!(old.refresh(600), (Class::Success, None), "old connection");
    round_trip(&mut old, "after relay ctl reload");

    // A file that is not a certificate: refused with the reason, the second stays.
    pki.write_files("not a certificate\n", &second.key_pem);
    let (ok, stdout, stderr) = s.relay.ctl(&["reload"]);
    assert!(!ok, "reload of a broken certificate succeeded: {stdout}");
    assert!(!stderr.trim().is_empty(), "no reason given");
    println!("broken certificate: {}", stderr.trim());
    assert_eq!(new_certificate(&config), second.der);

    // A valid certificate with another certificate's key: refused, the second stays.
    let third = pki.leaf("relay-third");
    pki.write_files(&third.cert_pem, &second.key_pem);
    let (ok, stdout, stderr) = s.relay.ctl(&["reload"]);
    assert!(!ok, "reload of a mismatched key succeeded: {stdout}");
    assert!(!stderr.trim().is_empty(), "no reason given");
    println!("mismatched key: {}", stderr.trim());
    assert_eq!(new_certificate(&config), second.der);

    // SIGHUP re-reads the files too (asynchronously: poll a bounded number of handshakes).
    let fourth = pki.leaf("relay-fourth");
    pki.install(&fourth);
    let pid = i32::try_from(s.relay.pid()).expect("pid");
    // SAFETY: kill only sends a signal to our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = new_certificate(&config);
    while seen != fourth.der && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        seen = new_certificate(&config);
    }
    assert!(
        s.relay.is_running(),
        "SIGHUP stopped the relay:\n{}",
        s.relay.log()
    );
    assert_eq!(seen, fourth.der, "SIGHUP did not load the new certificate");

    // The connection from before every reload still works and still holds its allocation.
    assert_eq!(old.refresh(600), (Class::Success, None));
    round_trip(&mut old, "after SIGHUP");
    assert_eq!(s.relay.metric("relay_allocations"), 1);
    drop(old);
    assert_eq!(
        s.relay
            .wait_metric("relay_allocations", 0, Duration::from_secs(5)),
        0
    );
}

/// A certificate that cannot be used is a clear start-up error naming the file, not a panic;
/// the TOML keys `listen-tcp`, `listen-tls`, `tls-cert`, `tls-key` configure the same
/// listeners as the flags.
#[test]
fn bad_certificates_fail_the_start_clearly_and_toml_keys_configure_stream_listeners() {
    let mut pki = TestPki::new();
    let leaf = pki.leaf("relay-toml");
    pki.install(&leaf);
    let tls_port = free_tcp_port("127.0.0.1");
    let listen_tls = format!("127.0.0.1:{tls_port}");
    let missing = pki.dir().join("missing.pem");
    let garbage = pki.dir().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64!\n").expect("write");
    for (cert, key, named) in [
        (missing.as_path(), pki.key_path(), missing.clone()),
        (garbage.as_path(), pki.key_path(), garbage.clone()),
        (pki.cert_path().as_path(), garbage.clone(), garbage.clone()),
    ] {
        let out = std::process::Command::new("timeout")
            .arg("20")
            .arg(relay_tests::relay_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--listen-tls",
                &listen_tls,
                "--relay-ip",
                "127.0.0.1",
                "--realm",
                REALM,
                "--user",
                "alice:wonderland",
                "--admin",
                "127.0.0.1:0",
                "--tls-cert",
            ])
            .arg(cert)
            .arg("--tls-key")
            .arg(&key)
            .output()
            .expect("run relay");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{} / {}: {stderr}",
            cert.display(),
            key.display()
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains(&*named.to_string_lossy()),
            "the error does not name {}: {stderr}",
            named.display()
        );
    }

    let tcp_port = free_tcp_port("127.0.0.1");
    let config = pki.dir().join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"127.0.0.1:0\"]\nlisten-tcp = [\"127.0.0.1:{tcp_port}\"]\n\
             listen-tls = [\"{listen_tls}\"]\ntls-cert = \"{}\"\ntls-key = \"{}\"\n",
            pki.cert_path().display(),
            pki.key_path().display()
        ),
    )
    .expect("write config");
    let relay = Relay::start(&[
        "--config",
        config.to_str().expect("utf-8 path"),
        "--relay-ip",
        "127.0.0.1",
        "--realm",
        REALM,
        "--user",
        "alice:wonderland",
    ]);
    let tcp: SocketAddr = format!("127.0.0.1:{tcp_port}").parse().expect("addr");
    let tls: SocketAddr = listen_tls.parse().expect("addr");
    relay.wait_tcp_listening(tcp);
    relay.wait_tcp_listening(tls);
    let mut client = StreamClient::tcp(tcp, REALM);
    assert_eq!(client.binding(), Ok(client.local_addr()));
    let mut client = StreamClient::tls(tls, REALM, pki.client_config(&[]));
    assert_eq!(client.peer_certificate(), Some(leaf.der.clone()));
    assert_eq!(client.binding(), Ok(client.local_addr()));
}

/// The namespace lab with the XDP fast path on: UDP, TCP and TLS uclient runs at once. The UDP
/// client's ChannelData is forwarded by the kernel, the TCP/TLS clients' goes through relay
/// sockets, and `relay ctl allocations` shows each allocation's path and transport.
#[test]
fn lab_fast_path_forwards_udp_clients_while_tcp_and_tls_clients_use_the_socket_path() {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    lab.add_static_neighbours();
    let _far = FarEnds::of(&lab);
    let (pki, _) = TestPki::installed("relay-lab");
    let relay_ns = lab.relay.name().to_owned();
    let (rc, rp) = (lab.relay_client_if.clone(), lab.relay_peer_if.clone());
    let udp_listen = format!("{RELAY_CLIENT_SIDE_IP}:3478");
    let tcp_listen = format!("{RELAY_CLIENT_SIDE_IP}:3478");
    let tls_listen = format!("{RELAY_CLIENT_SIDE_IP}:5349");
    let (cert, key) = (pki.cert_path(), pki.key_path());
    let relay = Relay::start_with(
        &["ip", "netns", "exec", &relay_ns],
        &[
            "--listen",
            &udp_listen,
            "--listen-tcp",
            &tcp_listen,
            "--listen-tls",
            &tls_listen,
            "--tls-cert",
            cert.to_str().expect("utf-8 path"),
            "--tls-key",
            key.to_str().expect("utf-8 path"),
            "--relay-ip",
            RELAY_PEER_SIDE_IP,
            "--realm",
            REALM,
            "--user",
            "alice:wonderland",
            "--allow-peer",
            "198.18.2.0/24",
            "--legacy-channels",
            "--fastpath",
            "xdp",
            "--interface",
            &rc,
            "--interface",
            &rp,
        ],
        1,
    );
    let tcp: SocketAddr = tcp_listen.parse().expect("addr");
    let tls: SocketAddr = tls_listen.parse().expect("addr");
    relay.wait_tcp_listening(tcp);
    relay.wait_tcp_listening(tls);
    let _peer = echo_peer(&["ip", "netns", "exec", lab.peer.name()], LAB_PEER_IP, 3480);
    let echo: SocketAddr = format!("{LAB_PEER_IP}:3480").parse().expect("addr");

    // One client of each transport, held open, with a channel to the echo peer.
    let udp_socket = lab
        .client
        .run_inside(|| UdpSocket::bind((CLIENT_IP, 0)).expect("client socket"));
    let mut udp = Client::with_socket(udp_socket, udp_listen.parse().expect("addr"), REALM);
    udp.login("alice", "wonderland");
    udp.allocate();
    udp.bind_channel(0x4000, echo);
    let mut tcp_client = lab.client.run_inside(move || StreamClient::tcp(tcp, REALM));
    let config = pki.client_config(&[]);
    let mut tls_client = lab
        .client
        .run_inside(move || StreamClient::tls(tls, REALM, config));
    for client in [&mut tcp_client, &mut tls_client] {
        client.login("alice", "wonderland");
        client.allocate();
        client.bind_channel(0x4000, echo);
    }
    let list = allocations_json(&relay);
    assert_eq!(list.len(), 3, "{list:#?}");
    let udp_view = allocation_of(&list, udp.socket.local_addr().expect("addr"));
    assert_eq!(
        (udp_view["transport"].as_str(), udp_view["path"].as_str()),
        (Some("udp"), Some("kernel")),
        "{udp_view:#}"
    );
    for (client, transport) in [(&tcp_client, "tcp"), (&tls_client, "tls")] {
        let view = allocation_of(&list, client.local_addr());
        assert_eq!(
            (view["transport"].as_str(), view["path"].as_str()),
            (Some(transport), Some("socket")),
            "{view:#}"
        );
    }

    // 20 ChannelData round trips on each held client.
    for i in 0..20u32 {
        let payload = format!("udp {i}");
        let mut datagram = vec![0x40, 0x00];
        datagram.extend_from_slice(&u16::try_from(payload.len()).expect("short").to_be_bytes());
        datagram.extend_from_slice(payload.as_bytes());
        udp.send_raw(&datagram);
        let echoed = udp.recv().expect("echo over UDP");
        assert_eq!(echoed.get(4..4 + payload.len()), Some(payload.as_bytes()));
        for client in [&mut tcp_client, &mut tls_client] {
            let payload = format!("stream {i}");
            client
                .send_channel_data(0x4000, payload.as_bytes())
                .expect("send");
            assert_eq!(client.next_data(), Ok((0x4000, payload.into_bytes())));
        }
    }
    let list = allocations_json(&relay);
    let counters = |view: &Value, path: &str| {
        (
            view[path]["to_peer_packets"].as_u64(),
            view[path]["to_client_packets"].as_u64(),
        )
    };
    let udp_view = allocation_of(&list, udp.socket.local_addr().expect("addr"));
    assert_eq!(
        counters(&udp_view, "kernel"),
        (Some(20), Some(20)),
        "{udp_view:#}"
    );
    assert_eq!(
        counters(&udp_view, "socket"),
        (Some(0), Some(0)),
        "{udp_view:#}"
    );
    for client in [&tcp_client, &tls_client] {
        let view = allocation_of(&list, client.local_addr());
        assert_eq!(counters(&view, "socket"), (Some(20), Some(20)), "{view:#}");
        assert_eq!(counters(&view, "kernel"), (Some(0), Some(0)), "{view:#}");
    }

    // Three uclient runs at once (UDP, TCP, TLS), 4 sessions x 100 messages each.
    let ca = pki.ca_path();
    let ca = ca.to_str().expect("utf-8 path").to_owned();
    let client_ns = lab.client.name().to_owned();
    let runs: Vec<(&str, Vec<String>)> = vec![
        ("udp", vec!["-p".into(), "3478".into()]),
        ("tcp", vec!["-t".into(), "-p".into(), "3478".into()]),
        (
            "tls",
            vec![
                "-t".into(),
                "-S".into(),
                "-E".into(),
                ca.clone(),
                "-p".into(),
                "5349".into(),
            ],
        ),
    ];
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut sent_by: BTreeMap<&str, u64> = BTreeMap::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .iter()
            .map(|(label, extra)| {
                let client_ns = client_ns.as_str();
                scope.spawn(move || {
                    let mut args = vec![
                        "-u",
                        "alice",
                        "-w",
                        "wonderland",
                        "-e",
                        LAB_PEER_IP,
                        "-r",
                        "3480",
                        "-n",
                        "100",
                        "-m",
                        "4",
                        "-l",
                        "200",
                        "-z",
                        "5",
                        "-c",
                    ];
                    args.extend(extra.iter().map(String::as_str));
                    args.push(RELAY_CLIENT_SIDE_IP);
                    (
                        *label,
                        uclient_stream(&["ip", "netns", "exec", client_ns], &args),
                    )
                })
            })
            .collect();
        // While they run: which paths serve which transports (bounded sampling).
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) && handles.iter().any(|h| !h.is_finished())
        {
            for a in allocations_json(&relay) {
                let transport = a["transport"].as_str().unwrap_or("?").to_owned();
                let path = a["path"].as_str().unwrap_or("?").to_owned();
                let paths = seen.entry(transport).or_default();
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for handle in handles {
            let (label, (report, sent)) = handle.join().expect("uclient run");
            sent_by.insert(label, sent);
            assert_eq!(
                report.lost,
                Some(0),
                "{label}: {}\n{}",
                report.output,
                relay.log()
            );
            assert_eq!(
                (report.sent, report.received),
                (400, 400),
                "{label}: {}",
                report.output
            );
        }
    });
    println!("paths seen by transport during the runs: {seen:?}");
    for transport in ["tcp", "tls"] {
        assert_eq!(
            seen.get(transport).map(Vec::as_slice),
            Some(&["socket".to_owned()][..]),
            "{transport} allocations must stay on the socket path: {seen:?}"
        );
    }
    assert_eq!(
        seen.get("udp").map(|p| p.contains(&"kernel".to_owned())),
        Some(true),
        "{seen:?}"
    );

    // Relay-wide: the UDP clients' messages (uclient's 400 and the held client's 20) in the
    // kernel, the TCP/TLS clients' (800, or more after a repeated TLS run, and 40) in relay
    // sockets.
    let metric = |path: &str, direction: &str| {
        relay.metric(&format!(
            "relay_relayed_packets_total{{path=\"{path}\",direction=\"{direction}\"}}"
        ))
    };
    let kernel = 20 + sent_by["udp"];
    let socket = 40 + sent_by["tcp"] + sent_by["tls"];
    assert_eq!(metric("kernel", "to_peer"), kernel, "{}", relay.log());
    assert_eq!(metric("kernel", "to_client"), kernel);
    assert_eq!(metric("socket", "to_peer"), socket);
    assert_eq!(metric("socket", "to_client"), socket);
    for ns in [&lab.client, &lab.peer] {
        assert_eq!(ns.udp_counter("InCsumErrors"), 0, "{}", ns.name());
    }
    // The stream clients' allocations end with their connections (uclient's UDP allocations
    // live on until they expire: UDP has no connection to close).
    drop((tcp_client, tls_client));
    udp.delete();
    for transport in ["tcp", "tls"] {
        let gauge = format!("relay_allocations_by_transport{{transport=\"{transport}\"}}");
        assert_eq!(relay.wait_metric(&gauge, 0, Duration::from_secs(5)), 0);
        let gauge = format!("relay_connections{{transport=\"{transport}\"}}");
        assert_eq!(relay.wait_metric(&gauge, 0, Duration::from_secs(5)), 0);
    }
}

/// The tests' own client pipelines bursts over TCP and TLS (ChannelData and Send indications,
/// odd sizes so padding matters) to coturn's echo peer: every message comes back, in order,
/// intact. This is the strict zero-loss check of the relay's stream writer (uclient's TLS
/// reader is the weaker witness, see `support::uclient_stream`).
#[test]
fn pipelined_bursts_over_tcp_and_tls_come_back_complete_and_in_order() {
    let (pki, _) = TestPki::installed("relay-burst");
    let s = relay_with(&pki, &[]);
    let peer_port = free_udp_port(PEER_IP);
    let _peer = echo_peer(&[], PEER_IP, peer_port);
    let echo: SocketAddr = format!("{PEER_IP}:{peer_port}").parse().expect("addr");
    let clients = [
        StreamClient::tcp(s.tcp, REALM),
        StreamClient::tls(s.tls, REALM, pki.client_config(&[])),
    ];
    for mut client in clients {
        client.login("alice", "wonderland");
        client.allocate();
        client.bind_channel(0x4000, echo);
        // 10 bursts of 30 messages written back to back, then read back.
        for burst in 0..10u32 {
            let mut expected = Vec::new();
            let mut bytes = Vec::new();
            for i in 0..30u32 {
                let n = burst * 30 + i;
                let size = 101 + usize::try_from(n % 7).expect("small") * 97;
                let mut payload = n.to_be_bytes().to_vec();
                payload.resize(size, u8::try_from(n % 251).expect("small"));
                if n % 2 == 0 {
                    bytes.extend(support::stream::channel_data(0x4000, &payload));
                    expected.push((0x4000, payload));
                } else {
                    let mut b = relay::proto::stun::MessageBuilder::new(
                        Class::Indication,
                        Method::SEND,
                        relay::proto::stun::TransactionId([7; 12]),
                    );
                    b.add(&Attribute::XorPeerAddress(echo))
                        .add(&Attribute::Data(&payload));
                    bytes.extend(b.finish(None, true));
                    // A peer with a channel answers as ChannelData.
                    expected.push((0x4000, payload));
                }
            }
            client.send_raw(&bytes).expect("write the burst");
            for (i, want) in expected.into_iter().enumerate() {
                let got = client.next_data();
                assert_eq!(
                    got.as_ref()
                        .map(|(ch, d)| (*ch, d.len(), d.get(..4).map(<[u8]>::to_vec))),
                    Ok((want.0, want.1.len(), Some(want.1[..4].to_vec()))),
                    "burst {burst} message {i} to {}\n{}",
                    client.server,
                    s.relay.log()
                );
                assert_eq!(got, Ok(want));
            }
        }
    }
    assert_eq!(s.relay.metric("relay_stream_send_drops_total"), 0);
}
