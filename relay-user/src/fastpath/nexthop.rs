//! The next-hop table: one kernel next-hop entry per destination IP in use (client and peer
//! addresses), resolved from the kernel's routing and neighbour tables and kept current from
//! netlink events.
//!
//! Bindings refer to a destination's [`NextHopId`]; a route or neighbour change rewrites only
//! the next-hop entries, never the bindings. An entry is valid only when the kernel itself
//! could send to the destination right now: a unicast route out of an attached interface that
//! is up and has a MAC, and a resolved neighbour (the gateway, or the destination when on
//! link). Anything else is marked invalid and the kernel program passes those packets to the
//! socket path, which lets the stack resolve and send them.
//!
//! The table is pure logic over a [`RouteSource`] ([`Rtnl`] in production, a fake in tests).

use std::{
    collections::{HashMap, HashSet},
    io,
    net::IpAddr,
};

use super::netlink::{Event, Link, Neighbour, Route, Rtnl};

/// The kernel map value of one next hop (the map ABI's type).
pub use relay_common::{NextHop as NextHopValue, NEXT_HOP_VALID};

/// Index of a next-hop entry in the kernel map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NextHopId(pub u16);

/// Where the table gets routes and neighbours from.
pub trait RouteSource {
    /// The route of datagrams from `src` (a local address, when known) to `dst`.
    fn route_to(&mut self, src: Option<IpAddr>, dst: IpAddr) -> io::Result<Route>;
    fn link(&mut self, ifindex: u32) -> io::Result<Option<Link>>;
    fn neighbour(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<Option<Neighbour>>;
    /// Asks the kernel to resolve or re-confirm a neighbour; the answer comes as an event.
    fn kick_neighbour(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<()>;
}

impl RouteSource for Rtnl {
    fn route_to(&mut self, src: Option<IpAddr>, dst: IpAddr) -> io::Result<Route> {
        Rtnl::route_from(self, src, dst)
    }

    fn link(&mut self, ifindex: u32) -> io::Result<Option<Link>> {
        Rtnl::link(self, ifindex)
    }

    fn neighbour(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<Option<Neighbour>> {
        Rtnl::neighbour(self, ifindex, ip)
    }

    fn kick_neighbour(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<()> {
        Rtnl::kick_neighbour(self, ifindex, ip)
    }
}

/// Next-hop entries by id, refcounted per destination.
pub struct NextHops<S> {
    source: S,
    /// Interfaces the kernel program is attached to (it can only send out of those).
    attached: HashSet<u32>,
    /// Indexed by id; `None` is a free id.
    slots: Vec<Option<Destination>>,
    free: Vec<u16>,
    /// Ids by (local source address, destination).
    by_dst: HashMap<(Option<IpAddr>, IpAddr), u16>,
    capacity: u16,
}

struct Destination {
    /// The local address datagrams to `dst` leave from, if known: policy routing may route
    /// by source.
    src: Option<IpAddr>,
    dst: IpAddr,
    refs: u32,
    route: Route,
    value: NextHopValue,
    /// The unresolved neighbour already kicked, so its events do not kick it again (a
    /// neighbour that fails to resolve would otherwise be probed in a loop).
    kicked: Option<(u32, IpAddr)>,
    /// A netlink query failed: re-resolve on the next route event or periodic refresh.
    retry: bool,
}

impl Destination {
    /// (egress ifindex, neighbour IP) the kernel would send to.
    fn neighbour_key(&self) -> Option<(u32, IpAddr)> {
        match self.route {
            Route::Unicast { oif, gateway, .. } => Some((oif, gateway.unwrap_or(self.dst))),
            Route::Local | Route::Unreachable => None,
        }
    }

    fn oif(&self) -> Option<u32> {
        self.neighbour_key().map(|(oif, _)| oif)
    }
}

/// Link and neighbour answers within one pass, so many destinations behind one gateway cost
/// one query each, and each unresolved neighbour is kicked at most once per pass.
#[derive(Default)]
struct Pass {
    links: HashMap<u32, io::Result<Option<Link>>>,
    neighbours: HashMap<(u32, IpAddr), io::Result<Option<Neighbour>>>,
    kicked: HashSet<(u32, IpAddr)>,
}

impl Pass {
    fn link<S: RouteSource>(&mut self, source: &mut S, ifindex: u32) -> Result<Option<Link>, ()> {
        let answer = self
            .links
            .entry(ifindex)
            .or_insert_with(|| source.link(ifindex));
        match answer {
            Ok(link) => Ok(*link),
            Err(e) => {
                tracing::warn!(ifindex, "next hop: link query failed: {e}");
                Err(())
            }
        }
    }

    fn neighbour<S: RouteSource>(
        &mut self,
        source: &mut S,
        key: (u32, IpAddr),
    ) -> Result<Option<Neighbour>, ()> {
        let answer = self
            .neighbours
            .entry(key)
            .or_insert_with(|| source.neighbour(key.0, key.1));
        match answer {
            Ok(neighbour) => Ok(*neighbour),
            Err(e) => {
                tracing::warn!(ifindex = key.0, ip = %key.1, "next hop: neighbour query failed: {e}");
                Err(())
            }
        }
    }

    fn kick<S: RouteSource>(&mut self, source: &mut S, key: (u32, IpAddr)) {
        if self.kicked.insert(key) {
            if let Err(e) = source.kick_neighbour(key.0, key.1) {
                tracing::warn!(ifindex = key.0, ip = %key.1, "next hop: resolving neighbour failed: {e}");
            }
        }
    }
}

impl<S: RouteSource> NextHops<S> {
    /// An empty table handing out ids `0..capacity`.
    pub fn new(source: S, capacity: u16) -> Self {
        Self {
            source,
            attached: HashSet::new(),
            slots: Vec::new(),
            free: Vec::new(),
            by_dst: HashMap::new(),
            capacity,
        }
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// Destinations in use.
    pub fn len(&self) -> usize {
        self.by_dst.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_dst.is_empty()
    }

    /// The id of `dst` if it is in use.
    pub fn id_of(&self, dst: IpAddr) -> Option<NextHopId> {
        self.by_dst.get(&(None, dst)).copied().map(NextHopId)
    }

    /// The current kernel value of `id`, if it is in use.
    pub fn value(&self, id: NextHopId) -> Option<NextHopValue> {
        self.slot(id).map(|d| d.value)
    }

    /// The route last resolved for `id`.
    pub fn route(&self, id: NextHopId) -> Option<Route> {
        self.slot(id).map(|d| d.route)
    }

    /// Sets the interfaces the kernel program can send out of, and returns the entries whose
    /// value changed because of it.
    pub fn set_attached(&mut self, ifindexes: &[u32]) -> Vec<(NextHopId, NextHopValue)> {
        self.attached = ifindexes.iter().copied().collect();
        self.refresh(|_| Some(false))
    }

    /// Takes a reference on the next hop of `dst`, resolving it if it is new. `None` when the
    /// table is full. Read the value to write with [`NextHops::value`].
    pub fn acquire(&mut self, dst: IpAddr) -> Option<NextHopId> {
        self.acquire_from(None, dst)
    }

    /// [`NextHops::acquire`] for datagrams leaving from local address `src`: one next hop per
    /// (source, destination), resolved as the kernel routes the relay's own datagrams from
    /// `src` (source-based policy routing included).
    pub fn acquire_from(&mut self, src: Option<IpAddr>, dst: IpAddr) -> Option<NextHopId> {
        if let Some(&index) = self.by_dst.get(&(src, dst)) {
            if let Some(Some(destination)) = self.slots.get_mut(usize::from(index)) {
                destination.refs = destination.refs.saturating_add(1);
            }
            return Some(NextHopId(index));
        }
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let index = u16::try_from(self.slots.len()).ok()?;
                if index >= self.capacity {
                    return None;
                }
                self.slots.push(None);
                index
            }
        };
        let mut destination = Destination {
            src,
            dst,
            refs: 1,
            route: Route::Unreachable,
            value: NextHopValue::default(),
            kicked: None,
            retry: false,
        };
        resolve(
            &mut self.source,
            &self.attached,
            &mut Pass::default(),
            &mut destination,
            true,
        );
        if let Some(slot) = self.slots.get_mut(usize::from(index)) {
            *slot = Some(destination);
        }
        self.by_dst.insert((src, dst), index);
        Some(NextHopId(index))
    }

    /// Drops a reference; `true` when it was the last one and `id` is free again (the caller
    /// may then clear the kernel entry). Unknown ids are ignored.
    pub fn release(&mut self, id: NextHopId) -> bool {
        let Some(slot) = self.slots.get_mut(usize::from(id.0)) else {
            return false;
        };
        let Some(destination) = slot else {
            return false;
        };
        destination.refs = destination.refs.saturating_sub(1);
        if destination.refs > 0 {
            return false;
        }
        self.by_dst.remove(&(destination.src, destination.dst));
        *slot = None;
        self.free.push(id.0);
        true
    }

    /// Applies monitor events and returns the entries whose value changed.
    ///
    /// Neighbour events refresh the destinations that send to that neighbour; link events
    /// re-route the destinations on that link (an IPv4 link going down removes its routes
    /// without route events) and those without a usable route; route and overrun events
    /// re-route everything. Address events are not next-hop business.
    pub fn handle(&mut self, events: &[Event]) -> Vec<(NextHopId, NextHopValue)> {
        let mut everything = false;
        let mut links = HashSet::new();
        let mut neighbours = HashSet::new();
        for event in events {
            match *event {
                Event::Route | Event::Overrun => everything = true,
                Event::Link { ifindex } => {
                    links.insert(ifindex);
                }
                Event::Neighbour { ifindex, ip } => {
                    neighbours.insert((ifindex, ip));
                }
                Event::Address { .. } => {}
            }
        }
        if everything {
            return self.refresh(|_| Some(true));
        }
        if links.is_empty() && neighbours.is_empty() {
            return Vec::new();
        }
        let any_link = !links.is_empty();
        self.refresh(|destination| {
            let on_changed_link = destination.oif().is_some_and(|oif| links.contains(&oif));
            if on_changed_link {
                // The link changed under it: an unresolved neighbour deserves a new kick.
                destination.kicked = None;
            }
            let unrouted = destination.oif().is_none() || destination.retry;
            if on_changed_link || (any_link && unrouted) {
                Some(true)
            } else if destination
                .neighbour_key()
                .is_some_and(|key| neighbours.contains(&key))
            {
                Some(false)
            } else {
                None
            }
        })
    }

    /// Re-confirms every neighbour in use (call every ~15 s): XDP-forwarded traffic never
    /// passes the stack's neighbour code, so without this the entries would go STALE and be
    /// garbage-collected, bouncing traffic to the socket path. Also retries destinations whose
    /// last resolution failed, and returns the entries whose value changed.
    pub fn refresh_neighbours(&mut self) -> Vec<(NextHopId, NextHopValue)> {
        let mut pass = Pass::default();
        for destination in self.slots.iter().flatten() {
            if let Some(key) = destination.neighbour_key() {
                if self.attached.contains(&key.0) {
                    pass.kick(&mut self.source, key);
                }
            }
        }
        let mut changed = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(destination) = slot else { continue };
            if destination.retry
                && resolve(
                    &mut self.source,
                    &self.attached,
                    &mut pass,
                    destination,
                    true,
                )
            {
                changed.extend(id_of_index(index).map(|id| (id, destination.value)));
            }
        }
        changed
    }

    /// Re-resolves the destinations `select` picks (`Some(true)`: look the route up again,
    /// `Some(false)`: only the link and neighbour) and returns those whose value changed.
    fn refresh(
        &mut self,
        mut select: impl FnMut(&mut Destination) -> Option<bool>,
    ) -> Vec<(NextHopId, NextHopValue)> {
        let mut pass = Pass::default();
        let mut changed = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let Some(destination) = slot else { continue };
            let Some(reroute) = select(destination) else {
                continue;
            };
            if resolve(
                &mut self.source,
                &self.attached,
                &mut pass,
                destination,
                reroute,
            ) {
                changed.extend(id_of_index(index).map(|id| (id, destination.value)));
            }
        }
        changed
    }

    fn slot(&self, id: NextHopId) -> Option<&Destination> {
        self.slots.get(usize::from(id.0))?.as_ref()
    }
}

fn id_of_index(index: usize) -> Option<NextHopId> {
    u16::try_from(index).ok().map(NextHopId)
}

/// Recomputes `destination`'s value (after a new route lookup if `reroute`); `true` if it
/// changed.
fn resolve<S: RouteSource>(
    source: &mut S,
    attached: &HashSet<u32>,
    pass: &mut Pass,
    destination: &mut Destination,
    reroute: bool,
) -> bool {
    if reroute {
        destination.retry = false;
        destination.route = match source.route_to(destination.src, destination.dst) {
            Ok(route) => route,
            Err(e) => {
                tracing::warn!(dst = %destination.dst, "next hop: route query failed: {e}");
                destination.retry = true;
                Route::Unreachable
            }
        };
    }
    let value = compute(source, attached, pass, destination).unwrap_or_default();
    let changed = value != destination.value;
    destination.value = value;
    changed
}

/// The valid value of `destination`, or `None` if it cannot be forwarded to right now.
fn compute<S: RouteSource>(
    source: &mut S,
    attached: &HashSet<u32>,
    pass: &mut Pass,
    destination: &mut Destination,
) -> Option<NextHopValue> {
    let Route::Unicast { oif, mtu, .. } = destination.route else {
        return None;
    };
    let key = destination.neighbour_key()?;
    if destination.kicked.is_some_and(|kicked| kicked != key) {
        // The destination moved to another neighbour.
        destination.kicked = None;
    }
    if !attached.contains(&oif) {
        return None;
    }
    let link = match pass.link(source, oif) {
        Ok(link) => link?,
        Err(()) => {
            destination.retry = true;
            return None;
        }
    };
    if !link.up {
        return None;
    }
    let smac = link.mac?;
    let neighbour = match pass.neighbour(source, key) {
        Ok(neighbour) => neighbour,
        Err(()) => {
            destination.retry = true;
            return None;
        }
    };
    let Some(dmac) = neighbour.filter(Neighbour::usable).and_then(|n| n.mac) else {
        if destination.kicked.is_none() {
            pass.kick(source, key);
            destination.kicked = Some(key);
        }
        return None;
    };
    destination.kicked = None;
    let mtu = mtu.map_or(link.mtu, |route_mtu| route_mtu.min(link.mtu));
    Some(NextHopValue {
        ifindex: oif,
        mtu: u16::try_from(mtu).unwrap_or(u16::MAX),
        flags: NEXT_HOP_VALID,
        dmac,
        smac,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fastpath::netlink::{NUD_FAILED, NUD_INCOMPLETE, NUD_REACHABLE, NUD_STALE};

    const ETH0: u32 = 2;
    const ETH1: u32 = 3;
    const ETH0_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const ETH1_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
    const GW1_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0xfe];
    const GW2_MAC: [u8; 6] = [2, 0, 0, 0, 2, 0xfe];

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A routing and neighbour table in memory that records what was asked of it.
    #[derive(Default)]
    struct Fake {
        routes: HashMap<IpAddr, Route>,
        links: HashMap<u32, Link>,
        neighbours: HashMap<(u32, IpAddr), Neighbour>,
        kicks: Vec<(u32, IpAddr)>,
        route_queries: usize,
        fail: bool,
    }

    impl RouteSource for Fake {
        fn route_to(&mut self, _src: Option<IpAddr>, dst: IpAddr) -> io::Result<Route> {
            self.route_queries += 1;
            if self.fail {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "fake timeout"));
            }
            Ok(self.routes.get(&dst).copied().unwrap_or(Route::Unreachable))
        }
        fn link(&mut self, ifindex: u32) -> io::Result<Option<Link>> {
            Ok(self.links.get(&ifindex).copied())
        }
        fn neighbour(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<Option<Neighbour>> {
            Ok(self.neighbours.get(&(ifindex, ip)).copied())
        }
        fn kick_neighbour(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<()> {
            self.kicks.push((ifindex, ip));
            Ok(())
        }
    }

    impl Fake {
        fn on_link(&mut self, dst: &str, oif: u32) {
            self.routes.insert(
                ip(dst),
                Route::Unicast {
                    oif,
                    gateway: None,
                    mtu: None,
                },
            );
        }
        fn via(&mut self, dst: &str, oif: u32, gateway: &str) {
            self.routes.insert(
                ip(dst),
                Route::Unicast {
                    oif,
                    gateway: Some(ip(gateway)),
                    mtu: None,
                },
            );
        }
        fn neighbour_at(&mut self, oif: u32, at: &str, mac: [u8; 6], state: u16) {
            self.neighbours.insert(
                (oif, ip(at)),
                Neighbour {
                    mac: Some(mac),
                    state,
                },
            );
        }
        fn set_up(&mut self, oif: u32, up: bool) {
            if let Some(link) = self.links.get_mut(&oif) {
                link.up = up;
            }
        }
    }

    /// Two Ethernet links (MTU 1500 and 9000), both attached; a client on link, gateways
    /// 198.18.1.254 (eth0) and 198.18.2.254 (eth1) resolved.
    fn table() -> NextHops<Fake> {
        let mut fake = Fake::default();
        fake.links.insert(
            ETH0,
            Link {
                mac: Some(ETH0_MAC),
                mtu: 1500,
                up: true,
            },
        );
        fake.links.insert(
            ETH1,
            Link {
                mac: Some(ETH1_MAC),
                mtu: 9000,
                up: true,
            },
        );
        fake.on_link("198.18.1.2", ETH0);
        fake.neighbour_at(ETH0, "198.18.1.2", CLIENT_MAC, NUD_REACHABLE);
        fake.neighbour_at(ETH0, "198.18.1.254", GW1_MAC, NUD_STALE);
        fake.neighbour_at(ETH1, "198.18.2.254", GW2_MAC, NUD_REACHABLE);
        let mut table = NextHops::new(fake, 4);
        assert!(table.set_attached(&[ETH0, ETH1]).is_empty());
        table
    }

    fn value(table: &NextHops<Fake>, id: NextHopId) -> NextHopValue {
        table.value(id).expect("id in use")
    }

    #[test]
    fn ids_are_refcounted_reused_and_bounded() {
        let mut table = table();
        table.source_mut().on_link("198.18.1.3", ETH0);
        let a = table.acquire(ip("198.18.1.2")).unwrap();
        assert_eq!(
            table.acquire(ip("198.18.1.2")),
            Some(a),
            "same destination, same id"
        );
        let b = table.acquire(ip("198.18.1.3")).unwrap();
        let c = table.acquire(ip("198.18.9.1")).unwrap();
        let d = table.acquire(ip("2001:2::9")).unwrap();
        assert_eq!([a, b, c, d].map(|id| id.0), [0, 1, 2, 3]);
        assert_eq!(table.acquire(ip("198.18.9.2")), None, "capacity 4 is full");
        assert_eq!(table.len(), 4);

        assert!(!table.release(a), "one reference left");
        assert!(table.value(a).is_some());
        assert!(table.release(a));
        assert_eq!(table.value(a), None);
        assert_eq!(table.id_of(ip("198.18.1.2")), None);
        assert!(!table.release(a), "double release is ignored");
        assert!(!table.release(NextHopId(900)), "unknown id is ignored");

        let e = table.acquire(ip("198.18.9.2")).unwrap();
        assert_eq!(e, a, "the freed id is reused");
        assert_eq!(table.id_of(ip("198.18.9.2")), Some(e));
        assert_eq!(table.len(), 4);
    }

    #[test]
    fn resolved_on_link_destination_is_valid() {
        let mut table = table();
        table.source_mut().routes.insert(
            ip("198.18.1.2"),
            Route::Unicast {
                oif: ETH0,
                gateway: None,
                mtu: Some(1400),
            },
        );
        let id = table.acquire(ip("198.18.1.2")).unwrap();
        assert_eq!(
            value(&table, id),
            NextHopValue {
                ifindex: ETH0,
                mtu: 1400,
                flags: NEXT_HOP_VALID,
                dmac: CLIENT_MAC,
                smac: ETH0_MAC,
            }
        );
        assert!(table.source().kicks.is_empty(), "resolved: nothing to kick");

        // Via a gateway: the gateway's MAC, the link's MTU when the route has none.
        table.source_mut().via("198.18.7.7", ETH1, "198.18.2.254");
        let id = table.acquire(ip("198.18.7.7")).unwrap();
        let v = value(&table, id);
        assert!(v.is_valid());
        assert_eq!(
            (v.ifindex, v.mtu, v.dmac, v.smac),
            (ETH1, 9000, GW2_MAC, ETH1_MAC)
        );
    }

    #[test]
    fn invalid_unless_everything_holds() {
        let mut table = table();
        let fake = table.source_mut();
        fake.routes.insert(ip("198.18.1.1"), Route::Local);
        fake.on_link("198.18.1.20", ETH0); // no neighbour entry
        fake.on_link("198.18.1.21", ETH0);
        fake.neighbour_at(ETH0, "198.18.1.21", CLIENT_MAC, NUD_FAILED);
        fake.on_link("198.18.1.22", ETH0);
        fake.neighbours.insert(
            (ETH0, ip("198.18.1.22")),
            Neighbour {
                mac: None,
                state: NUD_INCOMPLETE,
            },
        );
        fake.links.insert(
            9,
            Link {
                mac: None,
                mtu: 1400,
                up: true,
            },
        );
        fake.on_link("198.18.9.2", 9);
        fake.neighbour_at(9, "198.18.9.2", CLIENT_MAC, NUD_REACHABLE);
        for dst in [
            "198.18.1.1",  // local
            "198.18.3.3",  // unreachable
            "198.18.1.20", // no neighbour
            "198.18.1.21", // failed neighbour
            "198.18.1.22", // incomplete neighbour
        ] {
            let id = table.acquire(ip(dst)).unwrap();
            assert_eq!(value(&table, id), NextHopValue::default(), "{dst}");
            table.release(id);
        }
        // Link without a MAC (attached, so only the MAC is missing).
        table.set_attached(&[ETH0, ETH1, 9]);
        let id = table.acquire(ip("198.18.9.2")).unwrap();
        assert!(!value(&table, id).is_valid());
    }

    #[test]
    fn unattached_egress_is_invalid_until_attached() {
        let mut table = table();
        table.set_attached(&[ETH1]);
        let id = table.acquire(ip("198.18.1.2")).unwrap();
        assert!(!value(&table, id).is_valid());
        assert!(
            table.source().kicks.is_empty(),
            "no ARP for links we cannot use"
        );
        let changed = table.set_attached(&[ETH0, ETH1]);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].0, id);
        assert!(changed[0].1.is_valid());
        assert!(
            table.set_attached(&[ETH0, ETH1]).is_empty(),
            "no change, no output"
        );
        let changed = table.set_attached(&[]);
        assert_eq!(changed, vec![(id, NextHopValue::default())]);
    }

    #[test]
    fn unresolved_neighbour_is_kicked_once_and_resolves_by_event() {
        let mut table = table();
        table.source_mut().on_link("198.18.1.5", ETH0);
        let id = table.acquire(ip("198.18.1.5")).unwrap();
        assert!(!value(&table, id).is_valid());
        assert_eq!(table.source().kicks, vec![(ETH0, ip("198.18.1.5"))]);

        // The kick created an INCOMPLETE entry: an event, still unresolved, no second kick.
        let event = Event::Neighbour {
            ifindex: ETH0,
            ip: ip("198.18.1.5"),
        };
        table.source_mut().neighbours.insert(
            (ETH0, ip("198.18.1.5")),
            Neighbour {
                mac: None,
                state: NUD_INCOMPLETE,
            },
        );
        assert!(table.handle(&[event]).is_empty());
        assert_eq!(table.source().kicks.len(), 1);

        // Resolution arrives.
        table
            .source_mut()
            .neighbour_at(ETH0, "198.18.1.5", CLIENT_MAC, NUD_REACHABLE);
        let changed = table.handle(&[event]);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].0, id);
        assert_eq!(changed[0].1.dmac, CLIENT_MAC);
        assert!(changed[0].1.is_valid());
        assert_eq!(table.source().kicks.len(), 1);

        // Behind a gateway, the gateway is what gets resolved.
        table.source_mut().via("198.18.50.1", ETH1, "198.18.2.253");
        table.acquire(ip("198.18.50.1")).unwrap();
        assert_eq!(table.source().kicks[1], (ETH1, ip("198.18.2.253")));
    }

    #[test]
    fn neighbour_mac_change_rewrites_every_destination_behind_it() {
        let mut table = table();
        table.source_mut().via("198.18.40.1", ETH0, "198.18.1.254");
        table.source_mut().via("198.18.40.2", ETH0, "198.18.1.254");
        let a = table.acquire(ip("198.18.40.1")).unwrap();
        let b = table.acquire(ip("198.18.40.2")).unwrap();
        let client = table.acquire(ip("198.18.1.2")).unwrap();
        assert_eq!(value(&table, a).dmac, GW1_MAC);

        let event = Event::Neighbour {
            ifindex: ETH0,
            ip: ip("198.18.1.254"),
        };
        assert!(table.handle(&[event]).is_empty(), "same MAC: no output");
        let new_mac = [2, 0, 0, 0, 0x99, 0x99];
        table
            .source_mut()
            .neighbour_at(ETH0, "198.18.1.254", new_mac, NUD_REACHABLE);
        let mut changed = table.handle(&[event, event]);
        changed.sort_by_key(|(id, _)| *id);
        assert_eq!(
            changed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            vec![a, b]
        );
        assert!(changed
            .iter()
            .all(|(_, v)| v.dmac == new_mac && v.is_valid()));
        assert_eq!(
            value(&table, client).dmac,
            CLIENT_MAC,
            "other neighbour untouched"
        );
        // A neighbour event elsewhere never queries routes.
        let queries = table.source().route_queries;
        table.handle(&[Event::Neighbour {
            ifindex: ETH1,
            ip: ip("198.18.2.254"),
        }]);
        assert_eq!(table.source().route_queries, queries);
    }

    #[test]
    fn route_change_moves_destination_to_its_new_gateway() {
        let mut table = table();
        table.source_mut().via("198.18.40.1", ETH0, "198.18.1.254");
        table.source_mut().via("198.18.40.2", ETH0, "198.18.1.254");
        let a = table.acquire(ip("198.18.40.1")).unwrap();
        let b = table.acquire(ip("198.18.40.2")).unwrap();

        table.source_mut().via("198.18.40.1", ETH1, "198.18.2.254");
        let changed = table.handle(&[Event::Route]);
        assert_eq!(changed.len(), 1, "only the moved destination: {changed:?}");
        assert_eq!(changed[0].0, a);
        let v = changed[0].1;
        assert_eq!(
            (v.ifindex, v.dmac, v.smac, v.mtu),
            (ETH1, GW2_MAC, ETH1_MAC, 9000)
        );
        assert_eq!(
            table.route(a),
            Some(Route::Unicast {
                oif: ETH1,
                gateway: Some(ip("198.18.2.254")),
                mtu: None
            })
        );
        // Now a change of the old gateway's MAC no longer touches it.
        table
            .source_mut()
            .neighbour_at(ETH0, "198.18.1.254", [2, 0, 0, 0, 7, 7], NUD_REACHABLE);
        let changed = table.handle(&[Event::Neighbour {
            ifindex: ETH0,
            ip: ip("198.18.1.254"),
        }]);
        assert_eq!(
            changed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            vec![b]
        );

        // Moved to an unresolved gateway: invalid, and that gateway is kicked.
        table.source_mut().via("198.18.40.2", ETH1, "198.18.2.200");
        let changed = table.handle(&[Event::Overrun]);
        assert_eq!(changed, vec![(b, NextHopValue::default())]);
        assert_eq!(table.source().kicks, vec![(ETH1, ip("198.18.2.200"))]);
    }

    #[test]
    fn route_removal_and_restore() {
        let mut table = table();
        let id = table.acquire(ip("198.18.1.2")).unwrap();
        let valid = value(&table, id);
        assert!(valid.is_valid());
        assert!(table.handle(&[Event::Route]).is_empty(), "nothing changed");

        let saved = table.source_mut().routes.remove(&ip("198.18.1.2")).unwrap();
        assert_eq!(
            table.handle(&[Event::Route]),
            vec![(id, NextHopValue::default())]
        );
        assert_eq!(table.route(id), Some(Route::Unreachable));
        table.source_mut().routes.insert(ip("198.18.1.2"), saved);
        assert_eq!(table.handle(&[Event::Route]), vec![(id, valid)]);
    }

    #[test]
    fn link_down_and_up() {
        let mut table = table();
        let id = table.acquire(ip("198.18.1.2")).unwrap();
        let valid = value(&table, id);
        let other = Event::Link { ifindex: ETH1 };
        let eth0 = Event::Link { ifindex: ETH0 };

        table.source_mut().set_up(ETH0, false);
        assert!(table.handle(&[other]).is_empty(), "event for another link");
        assert_eq!(table.handle(&[eth0]), vec![(id, NextHopValue::default())]);

        // An IPv4 link going down takes its routes without route events; coming back up,
        // the destination is re-routed by the link event alone.
        let saved = table.source_mut().routes.remove(&ip("198.18.1.2")).unwrap();
        assert!(table.handle(&[eth0]).is_empty());
        table.source_mut().routes.insert(ip("198.18.1.2"), saved);
        table.source_mut().set_up(ETH0, true);
        assert_eq!(table.handle(&[eth0]), vec![(id, valid)]);
    }

    #[test]
    fn link_flap_kicks_an_unresolved_neighbour_again() {
        let mut table = table();
        table.source_mut().on_link("198.18.1.5", ETH0);
        table.acquire(ip("198.18.1.5")).unwrap();
        assert_eq!(table.source().kicks.len(), 1);
        table.handle(&[Event::Link { ifindex: ETH0 }]);
        assert_eq!(table.source().kicks.len(), 2);
        table.handle(&[Event::Neighbour {
            ifindex: ETH0,
            ip: ip("198.18.1.5"),
        }]);
        assert_eq!(table.source().kicks.len(), 2);
    }

    #[test]
    fn refresh_kicks_each_neighbour_in_use_once() {
        let mut table = table();
        table.source_mut().via("198.18.40.1", ETH0, "198.18.1.254");
        table.source_mut().via("198.18.40.2", ETH0, "198.18.1.254");
        table
            .source_mut()
            .routes
            .insert(ip("198.18.1.1"), Route::Local);
        for dst in ["198.18.40.1", "198.18.40.2", "198.18.1.2", "198.18.1.1"] {
            table.acquire(ip(dst)).unwrap();
        }
        assert!(table.source().kicks.is_empty());
        assert!(table.refresh_neighbours().is_empty());
        let mut kicks = table.source().kicks.clone();
        kicks.sort();
        assert_eq!(
            kicks,
            vec![(ETH0, ip("198.18.1.2")), (ETH0, ip("198.18.1.254"))]
        );
    }

    #[test]
    fn failed_queries_are_retried_by_refresh() {
        let mut table = table();
        table.source_mut().fail = true;
        let id = table.acquire(ip("198.18.1.2")).unwrap();
        assert!(!value(&table, id).is_valid());
        table.source_mut().fail = false;
        let changed = table.refresh_neighbours();
        assert_eq!(changed.len(), 1);
        assert!(changed[0].1.is_valid());
        assert!(table.refresh_neighbours().is_empty());
    }

    #[test]
    fn address_events_are_ignored() {
        let mut table = table();
        table.acquire(ip("198.18.1.2")).unwrap();
        let queries = table.source().route_queries;
        let changed = table.handle(&[Event::Address {
            ifindex: ETH0,
            ip: ip("198.18.1.1"),
            added: false,
        }]);
        assert!(changed.is_empty());
        assert_eq!(table.source().route_queries, queries);
    }
}
