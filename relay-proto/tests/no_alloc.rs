//! The per-datagram hot path allocates nothing: ChannelData from the client to the peer and a
//! peer's datagram to the client on a channel, with one allocation and with a thousand, counted
//! by a global allocator. A test binary of its own, so its allocator counts nothing else.

mod support;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    hint::black_box,
    time::Duration,
};

use relay_proto::server::Forward;
use support::Fixture;

/// Counts allocations made on the thread that armed it (the test harness's own threads
/// allocate as they please).
struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation() {
    // try_with: the allocator also runs while thread-locals are being torn down.
    let armed = ARMED.try_with(Cell::get).unwrap_or(false);
    if armed {
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

/// Allocations `f` makes on this thread.
fn allocations_in(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    ARMED.with(|a| a.set(true));
    f();
    ARMED.with(|a| a.set(false));
    ALLOCATIONS.with(Cell::get)
}

/// Relays `rounds` datagrams each way for every flow, running the timers between batches as
/// the daemon does; returns how many were forwarded.
fn flood(fixture: &mut Fixture, rounds: usize, message: &[u8], payload: &[u8]) -> usize {
    let mut forwarded = 0;
    for round in 0..rounds {
        for flow in &fixture.flows {
            let to_peer = fixture.server.handle_client_datagram(
                flow.client,
                fixture.listener,
                black_box(message),
                fixture.now,
            );
            if matches!(to_peer, Some(Forward::ToPeer { peer, .. }) if peer == fixture.peer) {
                forwarded += 1;
            }
            let to_client = fixture.server.handle_peer_datagram(
                flow.relayed,
                fixture.peer,
                black_box(payload),
                fixture.now,
            );
            if matches!(to_client, Some(Forward::ToClient { client, .. }) if client == flow.client)
            {
                forwarded += 1;
            }
        }
        if round % 32 == 31 {
            fixture.now += Duration::from_millis(1);
            if fixture
                .server
                .poll_timeout()
                .is_some_and(|at| at <= fixture.now)
            {
                fixture.server.handle_timeout(fixture.now);
            }
        }
    }
    forwarded
}

#[test]
fn channel_data_both_ways_allocates_nothing() {
    for allocations in [1, 1000] {
        let mut fixture = Fixture::new(allocations);
        let rounds = 20_000 / allocations;
        let (message, payload) = (Fixture::channel_data(120), vec![0x5a; 120]);
        let mut forwarded = 0;
        let counted = allocations_in(|| {
            forwarded = flood(&mut fixture, rounds, &message, &payload);
        });
        assert_eq!(
            forwarded,
            2 * rounds * allocations,
            "every datagram relayed ({allocations} allocations)"
        );
        assert_eq!(
            counted, 0,
            "allocations on the hot path with {allocations} allocations"
        );
        assert!(
            fixture.server.next_command().is_none(),
            "no commands either"
        );
    }
}

/// The counter works: a path that does allocate (a Data indication, built as a new message)
/// is seen.
#[test]
fn the_counter_sees_allocations() {
    let mut fixture = Fixture::new(1);
    let flow = fixture.flows[0];
    let other_port = std::net::SocketAddr::new(fixture.peer.ip(), fixture.peer.port() + 1);
    let counted = allocations_in(|| {
        let forward = fixture.server.handle_peer_datagram(
            flow.relayed,
            other_port,
            black_box(&[1, 2, 3]),
            fixture.now,
        );
        assert_eq!(forward, None, "no channel: a Data indication");
    });
    assert!(counted > 0);
    assert!(fixture.server.next_command().is_some());
}
