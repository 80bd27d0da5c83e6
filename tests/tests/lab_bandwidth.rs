//! The per-user bandwidth limit (issue 12 item 3) with the XDP fast path, in the
//! three-namespace lab (see lab_relay.rs): a user flooding on the kernel path is moved to the
//! socket path within a few samples (`relay ctl allocations --json` path `socket`), where its
//! delivered rate is then bounded by the limit, while another user under the limit stays on the
//! kernel path and loses nothing.
//!
//! Every flood is bounded in count and time, inside namespaces the test made (198.18.0.0/15).

mod support;

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use relay_tests::{
    fastpath::FarEnds,
    lab::{ThreeHosts, CLIENT_IP, PEER_IP, RELAY_CLIENT_SIDE_IP, RELAY_PEER_SIDE_IP},
    require_root,
};
use support::{client::Client, Relay};

const REALM: &str = "lab.test";
const PORT: &str = "3478";
const LIMIT: u64 = 100_000;
const BURST: u64 = 20_000;
const PAYLOAD: usize = 1000;

/// A peer socket in the peer namespace counting the payload bytes it receives.
struct Sink {
    addr: SocketAddr,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    fn start(lab: &ThreeHosts) -> Self {
        let socket = lab
            .peer
            .run_inside(|| UdpSocket::bind((PEER_IP, 0)).expect("peer socket"));
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let addr = socket.local_addr().expect("peer address");
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, done) = (Arc::clone(&bytes), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !done.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        });
        Self {
            addr,
            bytes,
            stop,
            thread: Some(thread),
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lab_client(lab: &ThreeHosts, user: &str, password: &str) -> Client {
    let socket = lab
        .client
        .run_inside(|| UdpSocket::bind((CLIENT_IP, 0)).expect("client socket"));
    let server = format!("{RELAY_CLIENT_SIDE_IP}:{PORT}");
    let mut client = Client::with_socket(socket, server.parse().expect("addr"), REALM);
    client.login(user, password);
    client
}

/// Sends `count` ChannelData messages of [`PAYLOAD`] bytes on 0x4000 spread over `over`.
fn paced(client: Client, count: u64, over: Duration) -> JoinHandle<()> {
    thread::spawn(move || {
        let message = relay::proto::channel_data::ChannelData {
            channel: 0x4000,
            data: &[0x5a; PAYLOAD],
        }
        .encode(false);
        let start = Instant::now();
        for i in 0..count {
            let due = start + over.mul_f64(i as f64 / count as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            client.send_raw(&message);
        }
    })
}

fn path_of(relay: &Relay, id: u64) -> String {
    relay
        .allocations()
        .allocations
        .iter()
        .find(|a| a.id == id)
        .map(|a| a.path.clone())
        .unwrap_or_default()
}

#[test]
fn xdp_user_over_the_limit_moves_to_the_socket_path_and_is_bounded() {
    require_root();
    let lab = ThreeHosts::new();
    lab.force_forwarding_off();
    lab.add_static_neighbours();
    let _far = FarEnds::of(&lab);
    let (rc, rp) = (lab.relay_client_if.clone(), lab.relay_peer_if.clone());
    let listen = format!("{RELAY_CLIENT_SIDE_IP}:{PORT}");
    let (limit, burst) = (LIMIT.to_string(), BURST.to_string());
    let relay_ns = lab.relay.name().to_owned();
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
            "--user",
            "bob:builder",
            "--allow-peer",
            "198.18.2.0/24",
            "--fastpath",
            "xdp",
            "--interface",
            &rc,
            "--interface",
            &rp,
            "--user-bandwidth",
            &limit,
            "--user-bandwidth-burst",
            &burst,
            "--log-level",
            "info",
        ],
        1,
    );
    let (alice_sink, bob_sink) = (Sink::start(&lab), Sink::start(&lab));
    let mut alice = lab_client(&lab, "alice", "wonderland");
    alice.allocate();
    alice.bind_channel(0x4000, alice_sink.addr);
    let mut bob = lab_client(&lab, "bob", "builder");
    bob.allocate();
    bob.bind_channel(0x4000, bob_sink.addr);
    let list = relay.allocations();
    assert_eq!(list.allocations.len(), 2);
    let id_of = |user: &str| {
        list.allocations
            .iter()
            .find(|a| a.user == user)
            .map(|a| a.id)
            .expect("allocation")
    };
    let (alice_id, bob_id) = (id_of("alice"), id_of("bob"));
    assert_eq!(path_of(&relay, alice_id), "kernel");
    assert_eq!(path_of(&relay, bob_id), "kernel");

    // Alice offers 500 kB/s for 7 s, Bob 20 kB/s at the same time.
    let flood = Duration::from_secs(7);
    let bob_sent = 140u64;
    let alice_thread = paced(alice, 3500, flood);
    let bob_thread = paced(bob, bob_sent, flood);
    // The sampler runs once a second: alice leaves the kernel within a few.
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut moved = false;
    while Instant::now() < deadline {
        if path_of(&relay, alice_id) == "socket" {
            moved = true;
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(moved, "alice stayed on the kernel path:\n{}", relay.log());
    assert_eq!(path_of(&relay, bob_id), "kernel", "bob was moved too");
    let alice_kernel = relay
        .allocations()
        .allocations
        .iter()
        .find(|a| a.id == alice_id)
        .map(|a| a.kernel.to_peer_packets)
        .unwrap_or(0);
    assert!(alice_kernel > 0, "alice never used the kernel path");

    // On the socket path the bucket bounds what arrives.
    let (t1, b1) = (Instant::now(), alice_sink.bytes());
    thread::sleep(Duration::from_secs(2));
    let (t2, b2) = (Instant::now(), alice_sink.bytes());
    let window = t2.duration_since(t1).as_secs_f64();
    let delivered = b2 - b1;
    let ceiling = LIMIT as f64 * (window + 0.2) + BURST as f64 + PAYLOAD as f64;
    eprintln!("alice on the socket path: {delivered} B in {window:.2} s (ceiling {ceiling:.0})");
    assert!(
        (delivered as f64) <= ceiling,
        "{delivered} B in {window:.2} s on the socket path, over the limit"
    );
    assert!(
        (delivered as f64) >= LIMIT as f64 * window * 0.5,
        "{delivered} B in {window:.2} s: the limit throttles, it does not cut off"
    );
    assert_eq!(
        path_of(&relay, alice_id),
        "socket",
        "alice went back while flooding"
    );
    alice_thread.join().expect("alice");
    bob_thread.join().expect("bob");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        bob_sink.bytes(),
        bob_sent * PAYLOAD as u64,
        "bob lost datagrams"
    );
    assert_eq!(path_of(&relay, bob_id), "kernel");
    assert!(
        relay.metric("relay_bandwidth_dropped_total{direction=\"to_peer\"}") > 0,
        "no drops counted"
    );
    let log = relay.log();
    assert!(
        log.contains("over --user-bandwidth") && log.contains("alice"),
        "the move is logged:\n{log}"
    );
    assert!(!log.contains("wonderland"), "a password in the log");
}
