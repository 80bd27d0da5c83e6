//! A small synchronous rtnetlink (NETLINK_ROUTE) client: the kernel's own answers for routes,
//! links, neighbours and addresses, and a monitor socket for their changes.
//!
//! Hand-rolled on `libc` so it stays small and has no async runtime: requests are built into a
//! byte buffer, replies are parsed from byte slices with every length checked, so no input the
//! socket delivers can make it panic. Every request waits at most [`Rtnl::timeout`].
//!
//! Wire format (include/uapi/linux/netlink.h, rtnetlink.h): a datagram holds one or more
//! messages, each a 16-byte `nlmsghdr` followed by a fixed family header (`rtmsg`,
//! `ifinfomsg`, `ndmsg`, `ifaddrmsg`) and type-length-value attributes, all padded to 4 bytes,
//! in host byte order.

use std::{
    io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

// Netlink header values (include/uapi/linux/netlink.h).
const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
const NETLINK_CAP_ACK: libc::c_int = 10;
/// Attribute type bits that are flags, not part of the type.
const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);

// rtnetlink message types (include/uapi/linux/rtnetlink.h).
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_GETNEIGH: u16 = 30;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;

// Route attributes and types.
const RTA_DST: u16 = 1;
const RTA_SRC: u16 = 2;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_METRICS: u16 = 8;
const RTA_VIA: u16 = 18;
const RTAX_MTU: u16 = 2;
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;

// Link attributes and flags (include/uapi/linux/if_link.h, if.h, if_arp.h).
const IFLA_ADDRESS: u16 = 1;
const IFLA_MTU: u16 = 4;
/// Nested XDP attributes of a link (include/uapi/linux/if_link.h).
const IFLA_XDP: u16 = 43;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_EXPECTED_FD: u16 = 8;
const NLA_F_NESTED: u16 = 0x8000;
/// `XDP_ATTACHED_*` values and the `XDP_FLAGS_*` mode each is detached with.
const XDP_ATTACHED_DRV: u8 = 1;
const XDP_ATTACHED_SKB: u8 = 2;
const XDP_ATTACHED_HW: u8 = 3;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
const XDP_FLAGS_HW_MODE: u32 = 1 << 3;
/// Detach (or replace) only if the program attached is still `IFLA_XDP_EXPECTED_FD`'s.
const XDP_FLAGS_REPLACE: u32 = 1 << 4;
const IFF_UP: u32 = 0x1;
/// Set by the kernel when the device is up and its operational state is UP or UNKNOWN
/// (dev_get_flags), i.e. it can carry traffic.
const IFF_RUNNING: u32 = 0x40;
const ARPHRD_ETHER: u16 = 1;

// Neighbour attributes, states and flags (include/uapi/linux/neighbour.h).
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NTF_USE: u8 = 0x01;
pub const NUD_INCOMPLETE: u16 = 0x01;
pub const NUD_REACHABLE: u16 = 0x02;
pub const NUD_STALE: u16 = 0x04;
pub const NUD_DELAY: u16 = 0x08;
pub const NUD_PROBE: u16 = 0x10;
pub const NUD_FAILED: u16 = 0x20;
pub const NUD_NOARP: u16 = 0x40;
pub const NUD_PERMANENT: u16 = 0x80;
/// States in which the kernel itself would transmit to the neighbour's link-layer address.
const NUD_USABLE: u16 =
    NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_PERMANENT | NUD_NOARP;

// Address attributes.
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

// Multicast groups the monitor joins.
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV4_RULE: u32 = 8;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RTNLGRP_IPV6_RULE: u32 = 19;

/// Largest datagram read at once. The kernel sizes dump datagrams after the reader's buffer
/// but caps them at 32 KiB, so this is never too small for a well-formed reply.
const RECV_BUFFER: usize = 64 * 1024;
/// How often a dump that the kernel flagged as interrupted (the table changed meanwhile) is
/// retried before giving up.
const DUMP_ATTEMPTS: usize = 3;
/// Bound on the datagrams [`Monitor::next_events`] reads in one call, so a storm of events
/// cannot keep the caller in here.
const MONITOR_BATCH: usize = 256;
/// Receive buffer asked for the monitor socket: large enough for a burst of neighbour events.
const MONITOR_RCVBUF: libc::c_int = 4 << 20;

/// The kernel's answer to "how would you send to this address" (`ip route get`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Sent out of `oif`, to `gateway` if the route has one, else to the destination directly.
    Unicast {
        oif: u32,
        gateway: Option<IpAddr>,
        /// The route's MTU metric (`ip route ... mtu N`, or a learned path MTU), if set.
        mtu: Option<u32>,
    },
    /// The destination is an address of this host.
    Local,
    /// No route, or a blackhole / unreachable / prohibit / throw route, or a broadcast or
    /// multicast destination: nothing the fast path can forward to.
    Unreachable,
}

/// A network interface as far as forwarding to it matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// The Ethernet address; `None` for interfaces without one (loopback, tun, ...).
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// Administratively up and operationally able to carry traffic (IFF_UP and IFF_RUNNING).
    pub up: bool,
}

/// An XDP program attached to an interface, as the link reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XdpAttachment {
    pub program_id: u32,
    /// `XDP_FLAGS_*` of the mode it runs in (driver, generic or offloaded).
    mode_flags: u32,
}

/// A neighbour table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    /// The link-layer address, if the entry has one of Ethernet size.
    pub mac: Option<[u8; 6]>,
    /// `NUD_*` state bits.
    pub state: u16,
}

impl Neighbour {
    /// Whether the kernel would send to `mac` in this state (it does in STALE, DELAY and PROBE
    /// too, while it re-confirms the entry).
    pub fn usable(&self) -> bool {
        self.mac.is_some() && self.state & NUD_USABLE != 0
    }
}

/// A change the monitor saw. Events carry just enough to find what to re-resolve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    Link {
        ifindex: u32,
    },
    Neighbour {
        ifindex: u32,
        ip: IpAddr,
    },
    /// A route or a routing rule changed somewhere: any destination may route differently.
    Route,
    Address {
        ifindex: u32,
        ip: IpAddr,
        added: bool,
    },
    /// The kernel dropped events because the socket buffer was full: re-resolve everything.
    Overrun,
}

/// A request socket for route, link, neighbour and address queries.
pub struct Rtnl {
    socket: Socket,
    seq: u32,
    timeout: Duration,
    buffer: Vec<u8>,
}

impl Rtnl {
    /// Default bound on one request; the kernel answers these in microseconds.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

    /// Opens a request socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let socket = Socket::open()?;
        // Errors then carry only the header of our request back, not all of it.
        socket.set_int(SOL_NETLINK, NETLINK_CAP_ACK, 1)?;
        Ok(Self {
            socket,
            seq: 0,
            timeout: Self::DEFAULT_TIMEOUT,
            buffer: vec![0; RECV_BUFFER],
        })
    }

    /// How long one request may wait for its answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// RTM_GETROUTE for `dst` (like `ip route get`): the kernel's own answer, including policy
    /// routing and multipath selection.
    pub fn route_to(&mut self, dst: IpAddr) -> io::Result<Route> {
        self.route_from(None, dst)
    }

    /// [`Rtnl::route_to`] for datagrams leaving from `src` (like `ip route get DST from SRC`),
    /// so source-based policy routing (`ip rule from SRC ...`) answers as it would for the
    /// relay's own sockets. `src` must be of `dst`'s family.
    pub fn route_from(&mut self, src: Option<IpAddr>, dst: IpAddr) -> io::Result<Route> {
        let (family, octets) = ip_parts(&dst);
        let prefix = if family == AF_INET { 32 } else { 128 };
        let src = src
            .filter(|s| s.is_ipv4() == dst.is_ipv4())
            .map(|s| ip_parts(&s).1);
        let src_len = if src.is_some() { prefix } else { 0 };
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        let header = [family, prefix, src_len, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut attributes: Vec<(u16, &[u8])> = vec![(RTA_DST, octets.as_slice())];
        if let Some(src) = &src {
            attributes.push((RTA_SRC, src.as_slice()));
        }
        let mut route = None;
        let result = self.request(
            RTM_GETROUTE,
            NLM_F_ACK,
            &header,
            &attributes,
            |ty, payload| {
                if ty == RTM_NEWROUTE {
                    route = Some(parse_route(payload));
                }
            },
        );
        match result {
            Ok(()) => route
                .flatten()
                .ok_or_else(|| invalid_data("RTM_GETROUTE answered without a usable route")),
            Err(e) if is_unreachable_error(&e) => Ok(Route::Unreachable),
            Err(e) => Err(e),
        }
    }

    /// The interface with index `ifindex`, or `None` if there is none.
    pub fn link(&mut self, ifindex: u32) -> io::Result<Option<Link>> {
        let index = ifindex_field(ifindex)?;
        // struct ifinfomsg: family, pad, type, index, flags, change.
        let mut header = [0u8; 16];
        put(&mut header, 4, &index.to_ne_bytes());
        let mut link = None;
        let result = self.request(RTM_GETLINK, NLM_F_ACK, &header, &[], |ty, payload| {
            if ty == RTM_NEWLINK {
                link = parse_link(payload);
            }
        });
        match result {
            Ok(()) => Ok(link),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The XDP program attached to `ifindex`, if there is one (in one mode; several at once,
    /// "multi", is reported as none of them).
    pub fn xdp_attachment(&mut self, ifindex: u32) -> io::Result<Option<XdpAttachment>> {
        let index = ifindex_field(ifindex)?;
        let mut header = [0u8; 16];
        put(&mut header, 4, &index.to_ne_bytes());
        let mut attachment = None;
        self.request(RTM_GETLINK, NLM_F_ACK, &header, &[], |ty, payload| {
            if ty == RTM_NEWLINK {
                attachment = parse_xdp_attachment(payload);
            }
        })?;
        Ok(attachment)
    }

    /// Detaches the program of `attachment` from `ifindex` the way `ip link set dev IFACE xdp
    /// off` does, but only if it is still `program` (a descriptor of it): another program
    /// attached meanwhile stays (EEXIST). Fails with EBUSY when a BPF link holds it.
    pub fn detach_xdp(
        &mut self,
        ifindex: u32,
        attachment: XdpAttachment,
        program: std::os::fd::BorrowedFd<'_>,
    ) -> io::Result<()> {
        let index = ifindex_field(ifindex)?;
        let mut header = [0u8; 16];
        put(&mut header, 4, &index.to_ne_bytes());
        let mut nested = Vec::new();
        for (ty, value) in [
            (IFLA_XDP_FD, (-1i32).to_ne_bytes()),
            (
                IFLA_XDP_FLAGS,
                (attachment.mode_flags | XDP_FLAGS_REPLACE).to_ne_bytes(),
            ),
            (IFLA_XDP_EXPECTED_FD, program.as_raw_fd().to_ne_bytes()),
        ] {
            nested.extend_from_slice(&8u16.to_ne_bytes());
            nested.extend_from_slice(&ty.to_ne_bytes());
            nested.extend_from_slice(&value);
        }
        self.request(
            RTM_SETLINK,
            NLM_F_ACK,
            &header,
            &[(IFLA_XDP | NLA_F_NESTED, nested.as_slice())],
            |_, _| {},
        )
    }

    /// The neighbour entry for `ip` on `ifindex`, or `None` if the kernel has none.
    pub fn neighbour(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<Option<Neighbour>> {
        let header = ndmsg(ifindex, &ip, 0)?;
        let (_, octets) = ip_parts(&ip);
        let mut neighbour = None;
        let result = self.request(
            RTM_GETNEIGH,
            NLM_F_ACK,
            &header,
            &[(NDA_DST, octets.as_slice())],
            |ty, payload| {
                if ty == RTM_NEWNEIGH {
                    neighbour = parse_neighbour(payload).map(|(_, _, n)| n);
                }
            },
        );
        match result {
            Ok(()) => Ok(neighbour),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// RTM_NEWNEIGH with NTF_USE (and NLM_F_CREATE): the kernel resolves, or re-confirms, the
    /// neighbour exactly as if the stack wanted to send to it (neigh_add → neigh_event_send).
    /// The outcome arrives later as a neighbour event.
    pub fn kick_neighbour(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<()> {
        let header = ndmsg(ifindex, &ip, NTF_USE)?;
        let (_, octets) = ip_parts(&ip);
        self.request(
            RTM_NEWNEIGH,
            NLM_F_ACK | NLM_F_CREATE,
            &header,
            &[(NDA_DST, octets.as_slice())],
            |_, _| {},
        )
    }

    /// Every address on every interface, both families (an RTM_GETADDR dump).
    pub fn addresses(&mut self) -> io::Result<Vec<(u32, IpAddr)>> {
        // struct ifaddrmsg: family (AF_UNSPEC: all), prefixlen, flags, scope, index.
        let header = [0u8; 8];
        let mut attempt = 0;
        loop {
            let mut addresses = Vec::new();
            let result = self.request(RTM_GETADDR, NLM_F_DUMP, &header, &[], |ty, payload| {
                if ty == RTM_NEWADDR {
                    if let Some(address) = parse_address(payload) {
                        addresses.push(address);
                    }
                }
            });
            attempt += 1;
            match result {
                Ok(()) => return Ok(addresses),
                Err(e) if e.kind() == io::ErrorKind::Interrupted && attempt < DUMP_ATTEMPTS => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one request and feeds every reply message of that request to `on_message` until
    /// the kernel's acknowledgement (or the end of the dump) arrives, or the timeout passes.
    fn request(
        &mut self,
        ty: u16,
        flags: u16,
        header: &[u8],
        attributes: &[(u16, &[u8])],
        mut on_message: impl FnMut(u16, &[u8]),
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let message = build_message(ty, NLM_F_REQUEST | flags, seq, header, attributes)?;
        self.socket.send(&message)?;
        let deadline = Instant::now() + self.timeout;
        let mut interrupted = false;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no rtnetlink answer before the timeout",
                ));
            }
            if !self.socket.wait_readable(remaining)? {
                continue;
            }
            let len = match self.socket.recv(&mut self.buffer) {
                Ok(Some(len)) => len,
                // Not from the kernel, or nothing there after all.
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            let datagram = self.buffer.get(..len).unwrap_or_default();
            for message in Messages::new(datagram) {
                let message = message?;
                // Late answers to an earlier request that timed out.
                if message.seq != seq {
                    continue;
                }
                interrupted |= message.flags & NLM_F_DUMP_INTR != 0;
                match message.ty {
                    NLMSG_NOOP => {}
                    NLMSG_ERROR => {
                        let errno = i32_at(message.payload, 0)
                            .ok_or_else(|| invalid_data("short rtnetlink error message"))?;
                        return if errno == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(errno.saturating_neg()))
                        };
                    }
                    NLMSG_DONE => {
                        // A dump may end with an error code instead of an error message.
                        let errno = i32_at(message.payload, 0).unwrap_or(0);
                        return if errno < 0 {
                            Err(io::Error::from_raw_os_error(errno.saturating_neg()))
                        } else if interrupted {
                            Err(io::Error::new(
                                io::ErrorKind::Interrupted,
                                "rtnetlink dump interrupted by a concurrent change",
                            ))
                        } else {
                            Ok(())
                        };
                    }
                    NLMSG_OVERRUN => return Err(invalid_data("rtnetlink reported an overrun")),
                    _ => on_message(message.ty, message.payload),
                }
            }
        }
    }
}

/// A socket joined to the link, neighbour, route, rule and address groups, reporting changes.
pub struct Monitor {
    socket: Socket,
    buffer: Vec<u8>,
}

impl Monitor {
    /// Opens the monitor in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let socket = Socket::open()?;
        for group in [
            RTNLGRP_LINK,
            RTNLGRP_NEIGH,
            RTNLGRP_IPV4_IFADDR,
            RTNLGRP_IPV6_IFADDR,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV6_ROUTE,
            RTNLGRP_IPV4_RULE,
            RTNLGRP_IPV6_RULE,
        ] {
            let group = libc::c_int::try_from(group)
                .map_err(|_| invalid_data("netlink group out of range"))?;
            socket.set_int(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)?;
        }
        // A large buffer makes overruns rare; SO_RCVBUFFORCE passes rmem_max with
        // CAP_NET_ADMIN, and the plain option (capped at rmem_max) is the fallback.
        if socket
            .set_int(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, MONITOR_RCVBUF)
            .is_err()
        {
            socket.set_int(libc::SOL_SOCKET, libc::SO_RCVBUF, MONITOR_RCVBUF)?;
        }
        Ok(Self {
            socket,
            buffer: vec![0; RECV_BUFFER],
        })
    }

    /// Waits up to `timeout` for events and returns those read (empty on timeout). A kernel
    /// overrun (ENOBUFS: events were lost) is reported as [`Event::Overrun`].
    pub fn next_events(&mut self, timeout: Duration) -> io::Result<Vec<Event>> {
        let mut events = Vec::new();
        if !self.socket.wait_readable(timeout)? {
            return Ok(events);
        }
        for _ in 0..MONITOR_BATCH {
            let len = match self.socket.recv(&mut self.buffer) {
                Ok(Some(len)) => len,
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    events.push(Event::Overrun);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    // A truncated datagram lost events just like an overrun did.
                    events.push(Event::Overrun);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let datagram = self.buffer.get(..len).unwrap_or_default();
            for message in Messages::new(datagram) {
                match message {
                    Ok(message) => events.extend(parse_event(message.ty, message.payload)),
                    // The rest of a malformed datagram cannot be trusted; treat it as lost.
                    Err(_) => {
                        events.push(Event::Overrun);
                        break;
                    }
                }
            }
        }
        Ok(events)
    }
}

/// One parsed netlink message, borrowing its payload from the datagram.
struct Message<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The messages of one datagram; yields an error (then stops) on a malformed header.
struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(datagram: &'a [u8]) -> Self {
        Self { rest: datagram }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = io::Result<Message<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = mem::take(&mut self.rest);
        let parsed = (|| {
            let len = usize::try_from(u32_at(rest, 0)?).ok()?;
            if len < NLMSG_HDRLEN || len > rest.len() {
                return None;
            }
            let message = Message {
                ty: u16_at(rest, 4)?,
                flags: u16_at(rest, 6)?,
                seq: u32_at(rest, 8)?,
                payload: rest.get(NLMSG_HDRLEN..len)?,
            };
            Some((message, rest.get(align4(len).min(rest.len())..)?))
        })();
        match parsed {
            Some((message, next)) => {
                self.rest = next;
                Some(Ok(message))
            }
            None => Some(Err(invalid_data("malformed rtnetlink message header"))),
        }
    }
}

/// The type-length-value attributes after a family header; stops at the first malformed one.
struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Attributes<'a> {
    /// Attributes of `payload` after its `header_len`-byte family header.
    fn after(payload: &'a [u8], header_len: usize) -> Self {
        Self {
            rest: payload.get(align4(header_len)..).unwrap_or_default(),
        }
    }
}

impl<'a> Iterator for Attributes<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = mem::take(&mut self.rest);
        let len = usize::from(u16_at(rest, 0)?);
        let ty = u16_at(rest, 2)? & NLA_TYPE_MASK;
        if len < 4 {
            return None;
        }
        let value = rest.get(4..len)?;
        self.rest = rest.get(align4(len).min(rest.len())..).unwrap_or_default();
        Some((ty, value))
    }
}

/// Decodes an RTM_NEWROUTE answer to RTM_GETROUTE; `None` if it lacks what a route needs.
fn parse_route(payload: &[u8]) -> Option<Route> {
    const RTMSG_LEN: usize = 12;
    let family = *payload.first()?;
    let route_type = *payload.get(7)?;
    if payload.len() < RTMSG_LEN {
        return None;
    }
    match route_type {
        RTN_UNICAST => {}
        RTN_LOCAL => return Some(Route::Local),
        _ => return Some(Route::Unreachable),
    }
    let (mut oif, mut gateway, mut mtu) = (None, None, None);
    for (ty, value) in Attributes::after(payload, RTMSG_LEN) {
        match ty {
            RTA_OIF => oif = u32_at(value, 0),
            RTA_GATEWAY => gateway = ip_from(family, value),
            // RFC 5549: an IPv4 route via an IPv6 next hop (struct rtvia: family, address).
            RTA_VIA => {
                let via_family = u16_at(value, 0).and_then(|f| u8::try_from(f).ok());
                gateway = via_family.and_then(|f| ip_from(f, value.get(2..)?));
            }
            RTA_METRICS => {
                mtu = Attributes { rest: value }
                    .find(|(metric, _)| *metric == RTAX_MTU)
                    .and_then(|(_, value)| u32_at(value, 0))
                    .filter(|mtu| *mtu > 0);
            }
            _ => {}
        }
    }
    match oif {
        Some(oif) if oif != 0 => Some(Route::Unicast { oif, gateway, mtu }),
        _ => None,
    }
}

fn parse_link(payload: &[u8]) -> Option<Link> {
    const IFINFOMSG_LEN: usize = 16;
    let link_type = u16_at(payload, 2)?;
    let flags = u32_at(payload, 8)?;
    let (mut mac, mut mtu) = (None, 0);
    for (ty, value) in Attributes::after(payload, IFINFOMSG_LEN) {
        match ty {
            IFLA_ADDRESS if link_type == ARPHRD_ETHER => mac = mac_from(value),
            IFLA_MTU => mtu = u32_at(value, 0).unwrap_or(0),
            _ => {}
        }
    }
    Some(Link {
        mac,
        mtu,
        up: flags & (IFF_UP | IFF_RUNNING) == IFF_UP | IFF_RUNNING,
    })
}

/// The XDP program of an RTM_NEWLINK message, if one is attached in a single mode.
fn parse_xdp_attachment(payload: &[u8]) -> Option<XdpAttachment> {
    const IFINFOMSG_LEN: usize = 16;
    let (_, xdp) = Attributes::after(payload, IFINFOMSG_LEN).find(|(ty, _)| *ty == IFLA_XDP)?;
    let (mut attached, mut program_id) = (0, 0);
    for (ty, value) in (Attributes { rest: xdp }) {
        match ty {
            IFLA_XDP_ATTACHED => attached = *value.first()?,
            IFLA_XDP_PROG_ID => program_id = u32_at(value, 0)?,
            _ => {}
        }
    }
    let mode_flags = match attached {
        XDP_ATTACHED_DRV => XDP_FLAGS_DRV_MODE,
        XDP_ATTACHED_SKB => XDP_FLAGS_SKB_MODE,
        XDP_ATTACHED_HW => XDP_FLAGS_HW_MODE,
        _ => return None,
    };
    (program_id != 0).then_some(XdpAttachment {
        program_id,
        mode_flags,
    })
}

/// Decodes an RTM_NEWNEIGH / RTM_DELNEIGH message into (ifindex, ip, entry). Entries of other
/// families (bridge FDB entries share the group) give `None`.
fn parse_neighbour(payload: &[u8]) -> Option<(u32, IpAddr, Neighbour)> {
    const NDMSG_LEN: usize = 12;
    let family = *payload.first()?;
    let ifindex = u32_at(payload, 4)?;
    let state = u16_at(payload, 8)?;
    let (mut ip, mut mac) = (None, None);
    for (ty, value) in Attributes::after(payload, NDMSG_LEN) {
        match ty {
            NDA_DST => ip = ip_from(family, value),
            NDA_LLADDR => mac = mac_from(value),
            _ => {}
        }
    }
    Some((ifindex, ip?, Neighbour { mac, state }))
}

/// Decodes an RTM_NEWADDR / RTM_DELADDR message into (ifindex, address).
fn parse_address(payload: &[u8]) -> Option<(u32, IpAddr)> {
    const IFADDRMSG_LEN: usize = 8;
    let family = *payload.first()?;
    let ifindex = u32_at(payload, 4)?;
    let (mut local, mut address) = (None, None);
    for (ty, value) in Attributes::after(payload, IFADDRMSG_LEN) {
        match ty {
            // On point-to-point links IFA_ADDRESS is the far end; IFA_LOCAL is ours.
            IFA_LOCAL => local = ip_from(family, value),
            IFA_ADDRESS => address = ip_from(family, value),
            _ => {}
        }
    }
    Some((ifindex, local.or(address)?))
}

fn parse_event(ty: u16, payload: &[u8]) -> Option<Event> {
    match ty {
        RTM_NEWLINK | RTM_DELLINK => Some(Event::Link {
            ifindex: u32_at(payload, 4)?,
        }),
        RTM_NEWNEIGH | RTM_DELNEIGH => {
            let (ifindex, ip, _) = parse_neighbour(payload)?;
            Some(Event::Neighbour { ifindex, ip })
        }
        RTM_NEWROUTE | RTM_DELROUTE | RTM_NEWRULE | RTM_DELRULE => Some(Event::Route),
        RTM_NEWADDR | RTM_DELADDR => {
            let (ifindex, ip) = parse_address(payload)?;
            Some(Event::Address {
                ifindex,
                ip,
                added: ty == RTM_NEWADDR,
            })
        }
        _ => None,
    }
}

/// Errors with which RTM_GETROUTE says "no usable route": unreachable, blackhole (EINVAL),
/// prohibit (EACCES), throw without a fallback (EAGAIN), no route at all.
fn is_unreachable_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ENETUNREACH
                | libc::EHOSTUNREACH
                | libc::EACCES
                | libc::EPERM
                | libc::EINVAL
                | libc::EAGAIN
        )
    )
}

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

fn ip_parts(ip: &IpAddr) -> (u8, Vec<u8>) {
    match ip {
        IpAddr::V4(v4) => (AF_INET, v4.octets().to_vec()),
        IpAddr::V6(v6) => (AF_INET6, v6.octets().to_vec()),
    }
}

fn ip_from(family: u8, bytes: &[u8]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?).into()),
        AF_INET6 => Some(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?).into()),
        _ => None,
    }
}

fn mac_from(bytes: &[u8]) -> Option<[u8; 6]> {
    <[u8; 6]>::try_from(bytes).ok()
}

fn ifindex_field(ifindex: u32) -> io::Result<i32> {
    i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index out of range"))
}

/// struct ndmsg: family, pad1, pad2, ifindex, state, flags, type.
fn ndmsg(ifindex: u32, ip: &IpAddr, flags: u8) -> io::Result<[u8; 12]> {
    let mut header = [0u8; 12];
    header[0] = ip_parts(ip).0;
    put(&mut header, 4, &ifindex_field(ifindex)?.to_ne_bytes());
    header[10] = flags;
    Ok(header)
}

fn build_message(
    ty: u16,
    flags: u16,
    seq: u32,
    header: &[u8],
    attributes: &[(u16, &[u8])],
) -> io::Result<Vec<u8>> {
    let too_long = || io::Error::new(io::ErrorKind::InvalidInput, "rtnetlink request too long");
    let mut message = vec![0u8; NLMSG_HDRLEN];
    message.extend_from_slice(header);
    message.resize(align4(message.len()), 0);
    for (ty, value) in attributes {
        let len = u16::try_from(value.len() + 4).map_err(|_| too_long())?;
        message.extend_from_slice(&len.to_ne_bytes());
        message.extend_from_slice(&ty.to_ne_bytes());
        message.extend_from_slice(value);
        message.resize(align4(message.len()), 0);
    }
    let total = u32::try_from(message.len()).map_err(|_| too_long())?;
    put(&mut message, 0, &total.to_ne_bytes());
    put(&mut message, 4, &ty.to_ne_bytes());
    put(&mut message, 6, &flags.to_ne_bytes());
    put(&mut message, 8, &seq.to_ne_bytes());
    // nlmsg_pid stays 0: the kernel fills in the sender's port id.
    Ok(message)
}

/// Copies `bytes` into `buffer` at `at`; callers pass offsets inside their own fixed headers.
fn put(buffer: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(slot) = buffer.get_mut(at..at + bytes.len()) {
        slot.copy_from_slice(bytes);
    }
}

fn align4(len: usize) -> usize {
    len.saturating_add(3) & !3
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(
        bytes.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn i32_at(bytes: &[u8], at: usize) -> Option<i32> {
    u32_at(bytes, at).map(|v| i32::from_ne_bytes(v.to_ne_bytes()))
}

fn invalid_data(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A NETLINK_ROUTE socket bound to a kernel-assigned port id.
struct Socket {
    fd: OwnedFd,
}

impl Socket {
    fn open() -> io::Result<Self> {
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let address = kernel_address();
        // SAFETY: `address` is a valid sockaddr_nl and the length passed is its size; port id
        // 0 asks the kernel to assign one.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_nl).cast(),
                sockaddr_nl_len(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    fn set_int(&self, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
        // SAFETY: the option value points to a live c_int and the length is its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn send(&self, message: &[u8]) -> io::Result<()> {
        let address = kernel_address();
        // SAFETY: the buffer and the address are live for the call and their lengths match.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
                (&address as *const libc::sockaddr_nl).cast(),
                sockaddr_nl_len(),
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        if usize::try_from(sent).ok() != Some(message.len()) {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short rtnetlink send",
            ));
        }
        Ok(())
    }

    /// Reads one datagram without blocking. `Ok(None)` when it did not come from the kernel
    /// (only the kernel's messages are trusted); an error if it did not fit in `buffer`.
    fn recv(&self, buffer: &mut [u8]) -> io::Result<Option<usize>> {
        let mut from = kernel_address();
        let mut from_len = sockaddr_nl_len();
        // SAFETY: buffer, address and length point to live memory of the sizes passed.
        // MSG_TRUNC makes netlink return the datagram's full length so truncation is visible.
        let len = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                (&mut from as *mut libc::sockaddr_nl).cast(),
                &mut from_len,
            )
        };
        let len = usize::try_from(len).map_err(|_| io::Error::last_os_error())?;
        if len > buffer.len() {
            return Err(invalid_data("rtnetlink datagram larger than the buffer"));
        }
        if from.nl_pid != 0 {
            return Ok(None);
        }
        Ok(Some(len))
    }

    /// Waits until a datagram can be read or `timeout` passes; `false` on timeout.
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        let mut pollfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // Round up so a sub-millisecond remainder still waits instead of spinning.
        let millis = timeout.as_micros().div_ceil(1000);
        let millis = libc::c_int::try_from(millis).unwrap_or(libc::c_int::MAX);
        // SAFETY: one live pollfd, count 1.
        let rc = unsafe { libc::poll(&mut pollfd, 1, millis) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        // POLLERR counts as readable: recv then reports the pending error (ENOBUFS).
        Ok(rc > 0)
    }
}

/// The kernel's netlink address (port id 0, no groups).
fn kernel_address() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain old data for which all-zero bytes are a valid value.
    let mut address: libc::sockaddr_nl = unsafe { mem::zeroed() };
    address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    address
}

fn sockaddr_nl_len() -> libc::socklen_t {
    mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut out = ((value.len() + 4) as u16).to_ne_bytes().to_vec();
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(align4(out.len()), 0);
        out
    }

    fn route_payload(route_type: u8, attributes: &[Vec<u8>]) -> Vec<u8> {
        let mut payload = vec![AF_INET, 32, 0, 0, 254, 0, 0, route_type, 0, 0, 0, 0];
        for a in attributes {
            payload.extend_from_slice(a);
        }
        payload
    }

    #[test]
    fn request_layout_matches_the_kernel_headers() {
        let message = build_message(
            RTM_GETROUTE,
            NLM_F_REQUEST | NLM_F_ACK,
            7,
            &[AF_INET, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            &[(RTA_DST, &[198, 18, 1, 2])],
        )
        .unwrap();
        assert_eq!(message.len(), 16 + 12 + 8);
        assert_eq!(u32_at(&message, 0), Some(36));
        assert_eq!(u16_at(&message, 4), Some(RTM_GETROUTE));
        assert_eq!(u16_at(&message, 6), Some(NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(u32_at(&message, 8), Some(7));
        assert_eq!(&message[28..36], &[8, 0, 1, 0, 198, 18, 1, 2]);
    }

    #[test]
    fn route_answers_decode() {
        let metrics = attr(RTAX_MTU, &1400u32.to_ne_bytes());
        let payload = route_payload(
            RTN_UNICAST,
            &[
                attr(RTA_DST, &[198, 18, 2, 2]),
                attr(RTA_OIF, &3u32.to_ne_bytes()),
                attr(RTA_GATEWAY, &[198, 18, 1, 254]),
                attr(RTA_METRICS | 0x8000, &metrics),
            ],
        );
        assert_eq!(
            parse_route(&payload),
            Some(Route::Unicast {
                oif: 3,
                gateway: Some("198.18.1.254".parse().unwrap()),
                mtu: Some(1400),
            })
        );
        let mut via = (AF_INET6 as u16).to_ne_bytes().to_vec();
        via.extend_from_slice(&"2001:2::1".parse::<Ipv6Addr>().unwrap().octets());
        let payload = route_payload(
            RTN_UNICAST,
            &[attr(RTA_OIF, &3u32.to_ne_bytes()), attr(RTA_VIA, &via)],
        );
        assert!(matches!(
            parse_route(&payload),
            Some(Route::Unicast {
                gateway: Some(IpAddr::V6(_)),
                mtu: None,
                ..
            })
        ));
        assert_eq!(
            parse_route(&route_payload(RTN_LOCAL, &[])),
            Some(Route::Local)
        );
        assert_eq!(
            parse_route(&route_payload(7, &[])),
            Some(Route::Unreachable)
        );
        // Unicast without an output interface is not a route we can use.
        assert_eq!(parse_route(&route_payload(RTN_UNICAST, &[])), None);
    }

    #[test]
    fn neighbour_and_address_messages_decode() {
        let mut payload = vec![AF_INET, 0, 0, 0];
        payload.extend_from_slice(&5u32.to_ne_bytes());
        payload.extend_from_slice(&NUD_STALE.to_ne_bytes());
        payload.extend_from_slice(&[0, 1]);
        payload.extend_from_slice(&attr(NDA_DST, &[198, 18, 1, 2]));
        payload.extend_from_slice(&attr(NDA_LLADDR, &[2, 0, 0, 0, 1, 2]));
        let (ifindex, ip, neighbour) = parse_neighbour(&payload).unwrap();
        assert_eq!((ifindex, ip), (5, "198.18.1.2".parse().unwrap()));
        assert!(neighbour.usable());
        assert_eq!(
            parse_event(RTM_DELNEIGH, &payload),
            Some(Event::Neighbour { ifindex: 5, ip })
        );

        let mut payload = vec![AF_INET, 24, 0, 0];
        payload.extend_from_slice(&9u32.to_ne_bytes());
        payload.extend_from_slice(&attr(IFA_ADDRESS, &[198, 18, 9, 9]));
        payload.extend_from_slice(&attr(IFA_LOCAL, &[198, 18, 9, 1]));
        assert_eq!(
            parse_event(RTM_NEWADDR, &payload),
            Some(Event::Address {
                ifindex: 9,
                ip: "198.18.9.1".parse().unwrap(),
                added: true
            })
        );
    }

    #[test]
    fn neighbour_usability_follows_state_and_mac() {
        let mac = Some([2, 0, 0, 0, 1, 2]);
        for state in [
            NUD_REACHABLE,
            NUD_STALE,
            NUD_DELAY,
            NUD_PROBE,
            NUD_PERMANENT,
        ] {
            assert!(Neighbour { mac, state }.usable(), "state {state:#x}");
        }
        for state in [0, NUD_INCOMPLETE, NUD_FAILED] {
            assert!(!Neighbour { mac, state }.usable(), "state {state:#x}");
        }
        let no_mac = Neighbour {
            mac: None,
            state: NUD_REACHABLE,
        };
        assert!(!no_mac.usable());
    }

    #[test]
    fn xdp_attachment_of_a_link() {
        let link = |xdp: &[Vec<u8>]| {
            let mut payload = vec![0u8; 16];
            payload.extend_from_slice(&attr(IFLA_MTU, &1500u32.to_ne_bytes()));
            let nested: Vec<u8> = xdp.concat();
            payload.extend_from_slice(&attr(IFLA_XDP | NLA_F_NESTED, &nested));
            payload
        };
        let generic = link(&[
            attr(IFLA_XDP_ATTACHED, &[XDP_ATTACHED_SKB]),
            attr(IFLA_XDP_PROG_ID, &77u32.to_ne_bytes()),
        ]);
        assert_eq!(
            parse_xdp_attachment(&generic),
            Some(XdpAttachment {
                program_id: 77,
                mode_flags: XDP_FLAGS_SKB_MODE
            })
        );
        let native = link(&[
            attr(IFLA_XDP_ATTACHED, &[XDP_ATTACHED_DRV]),
            attr(IFLA_XDP_PROG_ID, &78u32.to_ne_bytes()),
        ]);
        assert_eq!(
            parse_xdp_attachment(&native).map(|a| a.mode_flags),
            Some(XDP_FLAGS_DRV_MODE)
        );
        // Nothing attached, several modes at once, a truncated attribute: none.
        assert_eq!(
            parse_xdp_attachment(&link(&[attr(IFLA_XDP_ATTACHED, &[0])])),
            None
        );
        assert_eq!(
            parse_xdp_attachment(&link(&[attr(IFLA_XDP_ATTACHED, &[4])])),
            None
        );
        assert_eq!(
            parse_xdp_attachment(&link(&[
                attr(IFLA_XDP_ATTACHED, &[XDP_ATTACHED_SKB]),
                attr(IFLA_XDP_PROG_ID, &[1, 2]),
            ])),
            None
        );
        assert_eq!(parse_xdp_attachment(&[0u8; 16]), None);
    }

    #[test]
    fn link_flags_decide_up() {
        let mut payload = vec![0, 0];
        payload.extend_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        payload.extend_from_slice(&4i32.to_ne_bytes());
        payload.extend_from_slice(&(IFF_UP | IFF_RUNNING).to_ne_bytes());
        payload.extend_from_slice(&0u32.to_ne_bytes());
        payload.extend_from_slice(&attr(IFLA_MTU, &1500u32.to_ne_bytes()));
        payload.extend_from_slice(&attr(IFLA_ADDRESS, &[2, 0, 0, 0, 1, 1]));
        let link = parse_link(&payload).unwrap();
        assert_eq!(
            link,
            Link {
                mac: Some([2, 0, 0, 0, 1, 1]),
                mtu: 1500,
                up: true
            }
        );
        put(&mut payload, 8, &IFF_UP.to_ne_bytes());
        assert!(!parse_link(&payload).unwrap().up);
    }

    /// Every prefix and every byte flip of valid messages parses without panicking.
    #[test]
    fn malformed_input_never_panics() {
        let metrics = attr(RTAX_MTU, &1400u32.to_ne_bytes());
        let route = route_payload(
            RTN_UNICAST,
            &[
                attr(RTA_OIF, &3u32.to_ne_bytes()),
                attr(RTA_GATEWAY, &[198, 18, 1, 254]),
                attr(RTA_METRICS, &metrics),
            ],
        );
        let datagram =
            build_message(RTM_NEWROUTE, 0, 1, &route, &[(RTA_DST, &[1, 2, 3, 4])]).unwrap();
        for cut in 0..=datagram.len() {
            for flip in 0..datagram.len() {
                let mut bytes = datagram[..cut].to_vec();
                if let Some(b) = bytes.get_mut(flip) {
                    *b ^= 0xff;
                }
                for message in Messages::new(&bytes).flatten() {
                    for ty in [RTM_NEWROUTE, RTM_NEWLINK, RTM_NEWNEIGH, RTM_NEWADDR] {
                        let _ = parse_event(ty, message.payload);
                    }
                    let _ = parse_route(message.payload);
                    let _ = parse_link(message.payload);
                    let _ = parse_neighbour(message.payload);
                    let _ = parse_address(message.payload);
                }
            }
        }
        assert!(Messages::new(&[0xff; 3]).next().unwrap().is_err());
        assert!(Attributes::after(&[8, 0, 1, 0, 1, 2], 0).next().is_none());
        assert!(Attributes::after(&[2, 0, 1, 0], 0).next().is_none());
        let mut huge = datagram.clone();
        put(&mut huge, 0, &u32::MAX.to_ne_bytes());
        assert!(Messages::new(&huge).next().unwrap().is_err());
    }

    proptest::proptest! {
        /// Arbitrary datagrams never panic the parsers.
        #[test]
        fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            for message in Messages::new(&bytes).flatten() {
                for ty in [RTM_NEWROUTE, RTM_NEWLINK, RTM_DELNEIGH, RTM_DELADDR, RTM_NEWRULE] {
                    let _ = parse_event(ty, message.payload);
                }
                let _ = parse_route(message.payload);
                let _ = parse_link(message.payload);
            }
            let _ = parse_route(&bytes);
            let _ = parse_neighbour(&bytes);
            let _ = parse_address(&bytes);
        }
    }
}
