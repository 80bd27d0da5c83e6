//! The socket path's per-datagram I/O allocates nothing: receiving into the worker arena,
//! writing a ChannelData header into the headroom, queueing the datagram as a borrowed range
//! and flushing with sendmmsg (GSO runs and plain messages), for one flow (one socket, GSO
//! runs) and for many allocations (a datagram on each of many relay sockets, one transmit per
//! socket). Counted by a global allocator, in a test binary of its own. The core's decision in
//! between is counted by relay-proto's own test (tests/no_alloc.rs there).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
};

use relay::net::{
    bind_relay,
    recv::{Arena, Datagram, HEADROOM},
    send::SendQueue,
};

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation() {
    if ARMED.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    }
}

// SAFETY: every method forwards to the system allocator with the caller's own arguments; the
// counting only touches const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: the caller upholds GlobalAlloc::alloc's contract, passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: as for alloc.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from System through this allocator with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: as for dealloc, and the caller upholds realloc's contract for new_size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_in(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    ALLOCATIONS.with(Cell::get)
}

fn wait_readable(socket: &UdpSocket) {
    let mut pfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
    assert_eq!(n, 1, "datagrams did not arrive");
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// Sends `count` datagrams to each of `relays`, then relays them as the worker does: receive
/// from each socket into the arena, prepend a header, queue, flush to `sink`. Returns the
/// allocations made while relaying and how many datagrams were queued.
fn relay_round(
    relays: &[UdpSocket],
    count: usize,
    arena: &mut Arena,
    datagrams: &mut Vec<Datagram>,
    queue: &mut SendQueue,
    sink: SocketAddr,
) -> (u64, usize) {
    let sender = UdpSocket::bind(loopback()).expect("bind sender");
    let payload = [0x5a; 120];
    for relay in relays {
        for _ in 0..count {
            sender
                .send_to(&payload, relay.local_addr().expect("addr"))
                .expect("send");
        }
    }
    for relay in relays {
        wait_readable(relay);
    }
    let mut queued = 0;
    let out = relays[0].as_raw_fd();
    let allocations = allocations_in(|| {
        for (token, relay) in relays.iter().enumerate() {
            datagrams.clear();
            while datagrams.len() < count {
                arena
                    .recv(relay.as_raw_fd(), datagrams)
                    .expect("datagrams waiting");
            }
            for d in datagrams.iter() {
                assert!(arena.prepend(d, [0x40, 0x00, 0x00, 120]));
                queue.push_arena(
                    token as u64,
                    sink,
                    None,
                    d.start - HEADROOM,
                    d.len + HEADROOM,
                );
                queued += 1;
            }
        }
        let dropped = queue.flush(arena.bytes(), |_| Some(out));
        assert_eq!(dropped, 0);
        arena.clear();
    });
    (allocations, queued)
}

#[test]
fn receiving_and_sending_relayed_datagrams_allocates_nothing() {
    // The counter sees allocations on this thread.
    assert!(allocations_in(|| drop(std::hint::black_box(vec![1u8; 16]))) > 0);
    let sink = UdpSocket::bind(loopback()).expect("bind sink");
    let sink_addr = sink.local_addr().expect("addr");
    let mut arena = Arena::new(128, 65_535);
    let mut datagrams = Vec::with_capacity(32 * 64);
    let mut queue = SendQueue::default();
    // One flow: 32 datagrams on one socket (one GSO run); many allocations: one datagram on
    // each of 100 relay sockets.
    for (sockets, count) in [(1, 32), (100, 1)] {
        let relays: Vec<UdpSocket> = (0..sockets)
            .map(|_| bind_relay(loopback()).expect("bind relay"))
            .collect();
        for round in 0..3 {
            let (allocations, queued) = relay_round(
                &relays,
                count,
                &mut arena,
                &mut datagrams,
                &mut queue,
                sink_addr,
            );
            assert_eq!(queued, sockets * count);
            assert_eq!(
                allocations, 0,
                "{sockets} socket(s), round {round}: allocations while relaying"
            );
        }
    }
    // What was sent arrived, header first.
    let mut buf = [0u8; 2048];
    sink.set_nonblocking(true).expect("nonblocking");
    let len = sink.recv(&mut buf).expect("relayed datagram");
    assert_eq!(len, HEADROOM + 120);
    assert_eq!(buf[..4], [0x40, 0x00, 0x00, 120]);
}
