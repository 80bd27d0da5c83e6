//! Follows the host's addresses, routes, neighbours and links over netlink: the peer policy
//! denies every address of the host (not only the configured ones), and the fast path's next
//! hops follow route and neighbour changes.

use std::{
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::sync::watch;
use tracing::{debug, warn};

use super::{kernel_sync::KernelSync, worker::lock};
use crate::fastpath::netlink::{Event, Monitor, Rtnl};
use relay_proto::policy::HostAddresses;

/// How long one wait for netlink events lasts (also how quickly the thread sees a stop).
const POLL: Duration = Duration::from_millis(500);
/// How often the neighbours the fast path uses are re-confirmed.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(15);
/// How often every next hop's route is asked again: a path MTU the stack learnt (a PMTU
/// exception) raises no netlink event, and the kernel path must not send larger datagrams
/// with DF set into it.
const ROUTE_REFRESH: Duration = Duration::from_secs(60);

/// Replaces `host` with every address on every interface now.
pub fn refresh(host: &HostAddresses) {
    let addresses = Rtnl::open().and_then(|mut rtnl| rtnl.addresses());
    match addresses {
        Ok(addresses) => {
            debug!(count = addresses.len(), "host addresses");
            host.replace(addresses.into_iter().map(|(_, ip)| ip));
        }
        Err(error) => warn!(
            %error,
            "cannot list the host's addresses over netlink; only the configured ones are \
             denied as peers"
        ),
    }
}

/// Subscribes to netlink events; do it before the first [`refresh`], so no change between
/// the two is missed. `None` (with a warning) when netlink is unavailable: the relay then
/// works with the addresses and next hops it saw at start.
pub fn open_monitor() -> Option<Monitor> {
    match Monitor::open() {
        Ok(monitor) => Some(monitor),
        Err(error) => {
            warn!(%error, "cannot follow netlink events; host addresses and next hops are not kept current");
            None
        }
    }
}

/// Starts the thread that applies `monitor`'s events until `stop` turns true.
pub fn spawn_monitor(
    monitor: Option<Monitor>,
    kernel: Arc<Mutex<KernelSync>>,
    host: HostAddresses,
    stop: watch::Receiver<bool>,
) -> Option<JoinHandle<()>> {
    let mut monitor = monitor?;
    let thread = std::thread::Builder::new()
        .name("relay-netlink".to_owned())
        .spawn(move || {
            let mut last_refresh = Instant::now();
            let mut last_reroute = Instant::now();
            while !*stop.borrow() {
                let events = match monitor.next_events(POLL) {
                    Ok(events) => events,
                    Err(error) => {
                        warn!(%error, "reading netlink events failed; retrying");
                        std::thread::sleep(POLL);
                        vec![Event::Overrun]
                    }
                };
                let addresses_changed = events
                    .iter()
                    .any(|e| matches!(e, Event::Address { .. } | Event::Overrun));
                if addresses_changed {
                    refresh(&host);
                }
                if !events.is_empty() {
                    lock(&kernel).on_netlink(&events, addresses_changed);
                }
                if last_refresh.elapsed() >= NEIGHBOUR_REFRESH {
                    lock(&kernel).refresh_neighbours();
                    last_refresh = Instant::now();
                }
                if last_reroute.elapsed() >= ROUTE_REFRESH {
                    lock(&kernel).on_netlink(&[Event::Route], false);
                    last_reroute = Instant::now();
                }
            }
        });
    match thread {
        Ok(thread) => Some(thread),
        Err(error) => {
            warn!(%error, "cannot start the netlink thread");
            None
        }
    }
}
