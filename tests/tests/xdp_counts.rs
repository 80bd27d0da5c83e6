//! The XDP program, attached natively to a veth in a namespace of its own, counts every UDP
//! datagram it sees and passes it on to the socket that is waiting for it.

use std::{
    io::ErrorKind,
    net::UdpSocket,
    sync::mpsc,
    time::{Duration, Instant},
};

use relay::fastpath::{AttachMode, FastPath};
use relay_common::Reason;
use relay_tests::{
    lab::{TwoHosts, RELAY_CLIENT_SIDE_IP},
    require_root,
};

const DATAGRAMS: u64 = 500;
const PORT: u16 = 3478;

#[test]
fn native_xdp_counts_udp_and_passes_it() {
    require_root();
    let lab = TwoHosts::new();

    // The receiving socket lives in the relay namespace (a socket keeps the namespace it was
    // created in, whichever thread uses it later).
    let receiver = lab
        .relay
        .run_inside(|| UdpSocket::bind((RELAY_CLIENT_SIDE_IP, PORT)).expect("bind receiver"));
    receiver
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");

    // Load and attach inside the relay namespace, on a thread that stays there until the test
    // is done so the program is detached in the namespace it was attached in.
    let relay_if = lab.relay_if.clone();
    let (attached_tx, attached_rx) = mpsc::channel();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let relay_ns = format!("/run/netns/{}", lab.relay.name());
    let attach_thread = std::thread::spawn(move || {
        relay_tests::enter_netns(&relay_ns);
        let mut fastpath = FastPath::load().unwrap_or_else(|e| panic!("load: {e}"));
        fastpath
            .attach(&relay_if, AttachMode::XdpNative)
            .unwrap_or_else(|e| panic!("attach: {e}"));
        attached_tx.send(()).expect("main thread waits");
        done_rx.recv().expect("main thread signals");
        fastpath.verdict_counters().expect("read counters")
    });
    attached_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("program attached");
    let shown = lab.relay.ip(&["link", "show", "dev", &lab.relay_if]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("xdp"),
        "ip link does not show the XDP program: {shown}"
    );

    // Receive on a thread of its own while the client sends, so the socket buffer never fills.
    let receiving = std::thread::spawn(move || {
        let mut received = 0u64;
        let mut buf = [0u8; 64];
        let deadline = Instant::now() + Duration::from_secs(10);
        while received < DATAGRAMS && Instant::now() < deadline {
            match receiver.recv_from(&mut buf) {
                Ok((n, _)) => {
                    assert!(
                        buf[..n].starts_with(b"datagram "),
                        "payload changed in flight"
                    );
                    received += 1;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => panic!("recv: {e}"),
            }
        }
        received
    });

    lab.client.run_inside(|| {
        let sender = UdpSocket::bind("0.0.0.0:0").expect("bind sender");
        for i in 0..DATAGRAMS {
            let payload = format!("datagram {i:04}");
            sender
                .send_to(payload.as_bytes(), (RELAY_CLIENT_SIDE_IP, PORT))
                .expect("send");
            // The first datagram waits for ARP; the kernel queues only a few behind it.
            // Later ones are paced lightly so the receiver keeps up.
            if i == 0 {
                std::thread::sleep(Duration::from_millis(200));
            } else if i % 32 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    });

    // Every datagram must still arrive: the program passes what it does not forward.
    let received = receiving.join().expect("receiver thread");
    assert_eq!(received, DATAGRAMS, "datagrams lost behind XDP_PASS");

    done_tx.send(()).expect("attach thread waits");
    let counters = attach_thread.join().expect("attach thread");
    let count = |reason: Reason| {
        counters
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |c| c.1)
    };
    println!("verdict counters: {counters:?}");
    assert_eq!(
        count(Reason::PassUdpNoMatch),
        DATAGRAMS,
        "kernel UDP counter"
    );
    assert!(
        count(Reason::PassNotIp) >= 1,
        "ARP resolution should have been counted as not-IP"
    );
    for reason in [
        Reason::PassMalformedIp,
        Reason::PassMalformedUdp,
        Reason::PassTruncatedEthernet,
    ] {
        assert_eq!(count(reason), 0, "unexpected {}", reason.label());
    }

    // Dropping the fast path detached the program.
    let shown = lab.relay.ip(&["link", "show", "dev", &lab.relay_if]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        !shown.contains("prog/xdp"),
        "program still attached after drop: {shown}"
    );
}
