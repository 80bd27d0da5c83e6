//! A counting UDP echo peer inside a lab namespace, and ChannelData round trips through the
//! relay to it: what the lab suites use to prove which path relayed what.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use relay_tests::{
    lab::{ThreeHosts, PEER_IP},
    Netns,
};

use super::client::Client;

/// A UDP echo server that counts what it received; stops when dropped.
pub struct Echo {
    pub addr: SocketAddr,
    pub received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Echo {
    /// On the lab's peer address.
    pub fn start(lab: &ThreeHosts) -> Self {
        Self::start_in(&lab.peer, PEER_IP)
    }

    /// On `ip` inside `ns`, on a free port.
    pub fn start_in(ns: &Netns, ip: &'static str) -> Self {
        let socket = ns.run_inside(move || UdpSocket::bind((ip, 0)).expect("echo socket"));
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let addr = socket.local_addr().expect("echo address");
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, done) = (Arc::clone(&received), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !done.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    count.fetch_add(1, Ordering::Relaxed);
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        Self {
            addr,
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends one ChannelData message carrying `data` and waits for its echo; `true` if it came
/// back intact within the client's timeout.
pub fn round_trip(client: &Client, channel: u16, data: &str) -> bool {
    let mut message = channel.to_be_bytes().to_vec();
    message.extend_from_slice(&u16::try_from(data.len()).expect("short").to_be_bytes());
    message.extend_from_slice(data.as_bytes());
    client.send_raw(&message);
    // Skip anything that is not the echo of this message (a late echo of an earlier one).
    for _ in 0..4 {
        match client.recv() {
            Some(reply) if reply.get(4..) == Some(data.as_bytes()) => return true,
            Some(_) => continue,
            None => return false,
        }
    }
    false
}

/// `count` round trips one after the other (30 s at most); how many came back.
pub fn round_trips(client: &Client, channel: u16, count: usize, tag: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    (0..count)
        .filter(|i| {
            assert!(
                Instant::now() < deadline,
                "{tag}: round trips took too long"
            );
            round_trip(client, channel, &format!("{tag} {i:05}"))
        })
        .count()
}
