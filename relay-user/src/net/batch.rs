//! Batched UDP on Linux: `recvmmsg` for receiving, `sendmmsg` with UDP GSO (`UDP_SEGMENT`)
//! for sending.
//!
//! Sending groups consecutive datagrams that share destination and size (the last of a run may
//! be shorter) into one GSO super-datagram; everything else goes out as plain messages of the
//! same `sendmmsg` call. GSO support is probed once; an EIO/EINVAL from a GSO send turns it off
//! for good with one log line (drivers without checksum offload refuse it).
//!
//! Listeners bound to a wildcard address (0.0.0.0, ::) receive with IP_PKTINFO /
//! IPV6_RECVPKTINFO: the receiver reports the address each datagram was sent to, and a transmit
//! may name the source address it must leave from (RFC 8656 §2: the 5-tuple includes the server
//! address the client contacted, so answers must come from it, not from whatever address the
//! route picks on a multi-homed host).

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd,
    sync::atomic::{AtomicBool, Ordering},
};

use tokio::{io::Interest, net::UdpSocket};
use tracing::{debug, warn};

/// Datagrams per receive batch.
pub const RECV_BATCH: usize = 32;
/// Messages per `sendmmsg` call.
const SEND_BATCH: usize = 64;
/// Most segments the kernel takes in one GSO send (UDP_MAX_SEGMENTS).
const MAX_GSO_SEGMENTS: usize = 64;
/// Largest GSO super-datagram (an IP datagram carries at most 64 KiB).
const MAX_GSO_BYTES: usize = 65_000;
/// Largest segment grouped for GSO: a UDP payload that fits a 1500-byte MTU over IPv6. Larger
/// datagrams would make the whole run fail with EMSGSIZE where plain sends just fragment.
const MAX_GSO_SEGMENT: usize = 1452;

/// `UDP_SEGMENT` from linux/udp.h.
const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO` from linux/udp.h: the kernel may hand over several datagrams of one flow as one
/// buffer, with their size in a control message.
const UDP_GRO: libc::c_int = 104;

/// Lets the kernel coalesce datagrams of one flow on `socket` (UDP GRO); [`Receiver`] splits
/// them again. Best effort: without it every datagram simply arrives on its own.
pub fn enable_gro(socket: &impl AsRawFd) -> bool {
    set_udp_option(socket, UDP_GRO, 1)
}

/// Asks the kernel for the destination address of every datagram on `socket` (IP_PKTINFO for
/// IPv4, IPV6_RECVPKTINFO for IPv6), which [`Receiver`] then reports per datagram. Needed on
/// sockets bound to a wildcard address, where the bound address says nothing about which local
/// address a client contacted.
pub fn enable_pktinfo(socket: &impl AsRawFd, ipv6: bool) -> io::Result<()> {
    let (level, option) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    set_int_option(socket, level, option, 1)
}

/// CMSG_SPACE for `len` data bytes.
const fn cmsg_space(len: usize) -> usize {
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    unsafe { libc::CMSG_SPACE(len as libc::c_uint) as usize }
}

/// Control buffers are arrays of u64 so every control message header in them is aligned.
const CONTROL_WORD: usize = size_of::<u64>();

/// Words of control buffer a receive needs: the UDP_GRO segment size and the destination
/// address (an IPv6 pktinfo is the larger of the two families), both on one message.
const RECV_CONTROL_WORDS: usize = (cmsg_space(size_of::<libc::c_int>())
    + cmsg_space(size_of::<libc::in6_pktinfo>()))
.div_ceil(CONTROL_WORD);

/// Words of control buffer one sent message needs: the UDP_SEGMENT size and the source address.
const SEND_CONTROL_WORDS: usize = (cmsg_space(size_of::<u16>())
    + cmsg_space(size_of::<libc::in6_pktinfo>()))
.div_ceil(CONTROL_WORD);

static GSO_ENABLED: AtomicBool = AtomicBool::new(false);

/// Sets a SOL_UDP option to an int value; whether the kernel took it.
fn set_udp_option(socket: &impl AsRawFd, option: libc::c_int, value: libc::c_int) -> bool {
    set_int_option(socket, libc::SOL_UDP, option, value).is_ok()
}

/// Sets an int-valued socket option.
pub fn set_int_option(
    socket: &impl AsRawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads one c_int through a valid pointer with the matching length;
    // the fd is open for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Probes UDP GSO once at start; returns whether it is used.
pub fn probe_gso() -> bool {
    let supported = std::net::UdpSocket::bind("127.0.0.1:0")
        .map(|socket| set_udp_option(&socket, UDP_SEGMENT, 1200))
        .unwrap_or(false);
    GSO_ENABLED.store(supported, Ordering::Relaxed);
    supported
}

fn disable_gso(error: &io::Error) {
    if GSO_ENABLED.swap(false, Ordering::Relaxed) {
        warn!(%error, "UDP GSO send failed; sending without segmentation from now on");
    }
}

/// Where one received datagram came from, where it was sent to and where it lies in
/// [`Datagrams::data`].
#[derive(Clone, Debug)]
pub struct DatagramMeta {
    pub from: SocketAddr,
    /// The local address the datagram was sent to, when the socket reports it (wildcard
    /// listeners, see [`enable_pktinfo`]).
    pub to: Option<IpAddr>,
    pub range: std::ops::Range<usize>,
}

/// Received datagrams: one contiguous buffer plus metadata per datagram.
#[derive(Debug, Default)]
pub struct Datagrams {
    pub data: Vec<u8>,
    pub items: Vec<DatagramMeta>,
}

impl Datagrams {
    /// (source, payload) of each datagram.
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.iter_with_destination()
            .map(|(from, _, payload)| (from, payload))
    }

    /// (source, local destination address if known, payload) of each datagram.
    pub fn iter_with_destination(
        &self,
    ) -> impl Iterator<Item = (SocketAddr, Option<IpAddr>, &[u8])> {
        self.items.iter().map(|m| {
            (
                m.from,
                m.to,
                self.data.get(m.range.clone()).unwrap_or_default(),
            )
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Receive buffers for one socket, reused across batches.
pub struct Receiver {
    slot: usize,
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    /// One control buffer per slot (RECV_CONTROL_WORDS each), for the UDP_GRO segment size and
    /// the destination address.
    control: Vec<u64>,
}

// SAFETY: the raw pointers inside `iovecs`/`headers` only ever point into this struct's own
// `bufs`/`addrs`/`control` and are rebuilt before every use, so moving the struct to another thread is
// as safe as moving the Vecs.
unsafe impl Send for Receiver {}

impl Receiver {
    /// `batch` datagrams of up to `slot` bytes each. Pages of the buffer are only touched when
    /// a datagram lands in them, so large slots cost address space, not memory.
    pub fn new(batch: usize, slot: usize) -> Self {
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for which all-zero
        // bytes are a valid (empty) value.
        let (addr, iov, hdr) = unsafe {
            (
                zeroed::<libc::sockaddr_storage>(),
                zeroed::<libc::iovec>(),
                zeroed::<libc::mmsghdr>(),
            )
        };
        Self {
            slot,
            bufs: vec![0; batch * slot],
            addrs: vec![addr; batch],
            iovecs: vec![iov; batch],
            headers: vec![hdr; batch],
            control: vec![0; batch * RECV_CONTROL_WORDS],
        }
    }

    /// Waits until `socket` is readable, then takes up to a batch of datagrams into `out`
    /// (cleared first). Truncated datagrams (larger than a slot) are dropped.
    pub async fn recv(&mut self, socket: &UdpSocket, out: &mut Datagrams) -> io::Result<()> {
        loop {
            socket.readable().await?;
            match self.try_recv(socket, out) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return other,
            }
        }
    }

    /// Takes up to a batch of datagrams that are already waiting into `out` (cleared first);
    /// `WouldBlock` when there are none. Never waits, so one `Receiver` can serve many sockets
    /// of one thread.
    pub fn try_recv(&mut self, socket: &UdpSocket, out: &mut Datagrams) -> io::Result<()> {
        out.data.clear();
        out.items.clear();
        let n = socket.try_io(Interest::READABLE, || self.recv_now(socket.as_raw_fd()))?;
        self.collect(n, out);
        if out.is_empty() {
            // Only truncated datagrams: nothing for the caller, but the socket may hold more.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(())
    }

    fn recv_now(&mut self, fd: libc::c_int) -> io::Result<usize> {
        let batch = self.headers.len();
        for i in 0..batch {
            self.iovecs[i] = libc::iovec {
                iov_base: self.bufs[i * self.slot..].as_mut_ptr().cast(),
                iov_len: self.slot,
            };
            let hdr = &mut self.headers[i].msg_hdr;
            hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdr.msg_iov = &mut self.iovecs[i];
            hdr.msg_iovlen = 1;
            hdr.msg_control = self.control[i * RECV_CONTROL_WORDS..].as_mut_ptr().cast();
            hdr.msg_controllen = RECV_CONTROL_WORDS * CONTROL_WORD;
            hdr.msg_flags = 0;
            self.headers[i].msg_len = 0;
        }
        // SAFETY: every header points at a live iovec into `bufs` (slot bytes each, inside the
        // Vec), at a sockaddr_storage and at a control buffer, each with its real size; the
        // kernel writes at most that.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                batch as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn collect(&self, n: usize, out: &mut Datagrams) {
        for i in 0..n.min(self.headers.len()) {
            let header = &self.headers[i];
            if header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                debug!(
                    slot = self.slot,
                    "dropped a datagram larger than the receive slot"
                );
                continue;
            }
            let Some(from) = to_socket_addr(&self.addrs[i]) else {
                continue;
            };
            if header.msg_hdr.msg_flags & libc::MSG_CTRUNC != 0 {
                // Cannot happen with the buffer sized above; if it did, the destination may be
                // missing and a wildcard listener drops the datagram rather than guess.
                debug!("control data of a received datagram truncated");
            }
            let control = parse_control(&header.msg_hdr);
            if control.to == Destination::NotUnicast {
                // A broadcast or multicast datagram reached a wildcard listener: no answer can
                // come from the address it was sent to, and TURN is unicast only.
                debug!(%from, "dropped a datagram not sent to a unicast address");
                continue;
            }
            let to = match control.to {
                Destination::Unicast(ip) => Some(ip),
                _ => None,
            };
            let len = (header.msg_len as usize).min(self.slot);
            let start = out.data.len();
            out.data.extend_from_slice(
                self.bufs
                    .get(i * self.slot..i * self.slot + len)
                    .unwrap_or_default(),
            );
            // A GRO buffer holds datagrams of `segment` bytes (the last may be shorter).
            let segment = control.segment.filter(|s| *s > 0).unwrap_or(len);
            let mut at = start;
            while at < start + len {
                let end = (at + segment).min(start + len);
                out.items.push(DatagramMeta {
                    from,
                    to,
                    range: at..end,
                });
                at = end;
            }
            if len == 0 {
                out.items.push(DatagramMeta {
                    from,
                    to,
                    range: start..start,
                });
            }
        }
    }
}

/// The destination of a received datagram, from its pktinfo control message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Destination {
    /// No pktinfo (the socket did not ask for it).
    Unknown,
    /// A unicast address of this host.
    Unicast(IpAddr),
    /// A broadcast or multicast address.
    NotUnicast,
}

/// What the control messages of one received message say.
struct Control {
    /// UDP_GRO segment size, if the kernel coalesced datagrams.
    segment: Option<usize>,
    to: Destination,
}

/// Reads the UDP_GRO segment size and the pktinfo destination of a received message.
fn parse_control(hdr: &libc::msghdr) -> Control {
    let mut control = Control {
        segment: None,
        to: Destination::Unknown,
    };
    if hdr.msg_control.is_null() || hdr.msg_controllen < size_of::<libc::cmsghdr>() {
        return control;
    }
    // SAFETY: `hdr` is a message header the kernel just filled: msg_control points at our
    // control buffer of msg_controllen valid bytes, which the CMSG_* macros stay within; each
    // payload is read unaligned with the type its level/type pair says the kernel wrote.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::SOL_UDP, UDP_GRO) => {
                    let size = std::ptr::read_unaligned(data.cast::<libc::c_int>());
                    control.segment = usize::try_from(size).ok();
                }
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                    control.to = ipv4_destination(&info);
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    let ip = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                    control.to = if ip.is_multicast() {
                        Destination::NotUnicast
                    } else {
                        Destination::Unicast(IpAddr::V6(ip))
                    };
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    control
}

/// `ipi_addr` is the header's destination. For a datagram routed as local unicast the kernel
/// sets `ipi_spec_dst` to the same address; for a broadcast (including a subnet's directed
/// broadcast, which the address alone cannot tell) or multicast it is the receiving
/// interface's address instead. It is 0 when the kernel had no route to compute it from.
fn ipv4_destination(info: &libc::in_pktinfo) -> Destination {
    let to = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
    let spec = Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr));
    if to.is_multicast() || to.is_broadcast() || (!spec.is_unspecified() && spec != to) {
        Destination::NotUnicast
    } else {
        Destination::Unicast(IpAddr::V4(to))
    }
}

fn to_socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is large
            // enough and aligned for.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn to_storage(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe {
                (&mut storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe {
                (&mut storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6)
            };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// One outgoing datagram.
#[derive(Debug)]
pub struct Transmit {
    pub to: SocketAddr,
    /// The source address it must leave from, on a socket bound to a wildcard address; `None`
    /// lets the socket's own address (or, on a wildcard socket, the route) decide.
    pub src: Option<IpAddr>,
    pub payload: Vec<u8>,
}

/// A message as `sendmmsg` will see it: a plain datagram, or a GSO run.
struct Planned {
    to: SocketAddr,
    /// One source for the whole message: a GSO run is one sendmsg, with one pktinfo.
    src: Option<IpAddr>,
    /// Index range into the transmit queue.
    first: usize,
    count: usize,
    /// Segment size when `count > 1`.
    segment: usize,
}

/// Splits the queue into messages: runs of same-destination, same-source, same-size datagrams
/// become one GSO message (the last of a run may be shorter), the rest stay single.
fn plan(queue: &[Transmit], gso: bool) -> Vec<Planned> {
    let mut plan: Vec<Planned> = Vec::new();
    for (i, t) in queue.iter().enumerate() {
        if gso {
            if let Some(last) = plan.last_mut() {
                let prev = &queue[last.first + last.count - 1];
                let total = last.segment * last.count + t.payload.len();
                // A shorter datagram ends the run; equal sizes continue it.
                if last.to == t.to
                    && last.src == t.src
                    && last.segment <= MAX_GSO_SEGMENT
                    && prev.payload.len() == last.segment
                    && t.payload.len() <= last.segment
                    && !t.payload.is_empty()
                    && last.count < MAX_GSO_SEGMENTS
                    && total <= MAX_GSO_BYTES
                {
                    last.count += 1;
                    continue;
                }
            }
        }
        plan.push(Planned {
            to: t.to,
            src: t.src,
            first: i,
            count: 1,
            segment: t.payload.len(),
        });
    }
    plan
}

/// How long a flush waits for a full socket buffer before dropping what is left: one slow
/// socket must not stall the worker's other sockets, timers and admin requests for long.
const WRITABLE_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// Sends everything in `queue` from `socket` (which it empties); returns how many datagrams it
/// dropped. A full socket buffer is waited for briefly, then the rest is dropped; a datagram
/// the kernel refuses is dropped (UDP promises no delivery anyway). A GSO run the kernel
/// refuses is sent again datagram by datagram; only EIO, which says the device cannot
/// segment, turns GSO off for the whole relay.
pub async fn send_all(socket: &UdpSocket, queue: &mut Vec<Transmit>) -> usize {
    let mut done = 0;
    let mut dropped = 0;
    // Transmits before this index go out without segmentation (a refused run being retried).
    let mut plain_until = 0;
    while done < queue.len() {
        let gso = GSO_ENABLED.load(Ordering::Relaxed) && done >= plain_until;
        let pending = &queue[done..];
        let mut planned = plan(pending, gso);
        planned.truncate(SEND_BATCH);
        let result = socket.try_io(Interest::WRITABLE, || {
            send_now(socket.as_raw_fd(), pending, &planned)
        });
        let first_run = planned.first().map_or(1, |p| p.count);
        match result {
            Ok(sent) => done += sent.max(1).min(pending.len()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match tokio::time::timeout(WRITABLE_WAIT, socket.writable()).await {
                    Ok(Ok(())) => {}
                    _ => {
                        dropped += queue.len() - done;
                        debug!(
                            dropped = queue.len() - done,
                            "socket buffer full; datagrams dropped"
                        );
                        break;
                    }
                }
            }
            Err(e) if first_run > 1 => {
                if e.raw_os_error() == Some(libc::EIO) {
                    disable_gso(&e);
                }
                debug!(error = %e, segments = first_run, "GSO send refused; sending one by one");
                plain_until = done + first_run;
            }
            Err(e) => {
                // The first message was refused (e.g. EPERM, ENETUNREACH, EMSGSIZE): skip it.
                debug!(to = %pending[0].to, error = %e, "send failed; datagram dropped");
                dropped += 1;
                done += 1;
            }
        }
    }
    queue.clear();
    dropped
}

/// Appends a control message carrying `value` at byte `offset` of `buf`; returns the offset
/// after it. Control buffers are sized for everything a message carries (a unit test checks
/// the sizes), so one that does not fit is a bug: it is left out and logged, never written
/// past the buffer.
fn put_cmsg<T: Copy>(
    buf: &mut [u64],
    offset: usize,
    level: libc::c_int,
    kind: libc::c_int,
    value: T,
) -> usize {
    let space = cmsg_space(size_of::<T>());
    // Offsets are sums of CMSG_SPACE values, which keep headers aligned; check it anyway.
    if !offset.is_multiple_of(std::mem::align_of::<libc::cmsghdr>())
        || offset + space > buf.len() * CONTROL_WORD
    {
        warn!(
            level,
            kind, offset, "control buffer too small; control message left out"
        );
        return offset;
    }
    // SAFETY: [offset, offset + space) lies inside `buf` (checked above), `buf` is zeroed
    // u64s so the header at `offset` is aligned, and CMSG_DATA of a header points inside its
    // CMSG_SPACE; the payload is written unaligned.
    unsafe {
        let cmsg = buf
            .as_mut_ptr()
            .cast::<u8>()
            .add(offset)
            .cast::<libc::cmsghdr>();
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<T>() as libc::c_uint) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<T>(), value);
    }
    offset + space
}

/// Appends the pktinfo control message that makes a datagram leave from `src`. The interface
/// index stays 0: the route to the destination picks the interface, the pktinfo only fixes the
/// source address (which must be one of this host's).
fn put_source(buf: &mut [u64], offset: usize, src: IpAddr) -> usize {
    match src {
        IpAddr::V4(ip) => {
            let info = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(ip).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            put_cmsg(buf, offset, libc::IPPROTO_IP, libc::IP_PKTINFO, info)
        }
        IpAddr::V6(ip) => {
            let info = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                ipi6_ifindex: 0,
            };
            put_cmsg(buf, offset, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, info)
        }
    }
}

/// One `sendmmsg` call of the `planned` messages over the head of `queue`; returns how many
/// transmits were sent.
fn send_now(fd: libc::c_int, queue: &[Transmit], planned: &[Planned]) -> io::Result<usize> {
    // GSO runs need their payloads contiguous.
    let mut joined: Vec<Vec<u8>> = Vec::new();
    let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(planned.len());
    for p in planned {
        let (ptr, len) = if p.count == 1 {
            let payload = &queue[p.first].payload;
            (payload.as_ptr(), payload.len())
        } else {
            let mut buf = Vec::with_capacity(p.segment * p.count);
            for t in &queue[p.first..p.first + p.count] {
                buf.extend_from_slice(&t.payload);
            }
            let ptr = buf.as_ptr();
            let len = buf.len();
            joined.push(buf);
            (ptr, len)
        };
        iovecs.push(libc::iovec {
            iov_base: ptr.cast_mut().cast(),
            iov_len: len,
        });
    }
    let addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
        planned.iter().map(|p| to_storage(p.to)).collect();
    let mut control = vec![0u64; SEND_CONTROL_WORDS * planned.len()];
    // SAFETY: all-zero bytes are a valid mmsghdr.
    let mut headers: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; planned.len()];
    let messages = planned
        .iter()
        .zip(&addrs)
        .zip(iovecs.iter_mut())
        .zip(control.chunks_exact_mut(SEND_CONTROL_WORDS));
    for (header, (((p, (name, name_len)), iov), space)) in headers.iter_mut().zip(messages) {
        let hdr = &mut header.msg_hdr;
        hdr.msg_name = (name as *const libc::sockaddr_storage).cast_mut().cast();
        hdr.msg_namelen = *name_len;
        hdr.msg_iov = iov;
        hdr.msg_iovlen = 1;
        let mut used = 0;
        if let Some(src) = p.src {
            used = put_source(space, used, src);
        }
        if p.count > 1 {
            used = put_cmsg(space, used, libc::SOL_UDP, UDP_SEGMENT, p.segment as u16);
        }
        if used > 0 {
            hdr.msg_control = space.as_mut_ptr().cast();
            hdr.msg_controllen = used;
        }
    }
    // SAFETY: every header points at live iovecs (into `queue` or `joined`), addresses and
    // control buffers that outlive the call; lengths match the buffers.
    let n = unsafe {
        libc::sendmmsg(
            fd,
            headers.as_mut_ptr(),
            headers.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(planned.iter().take(n as usize).map(|p| p.count).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that switch GSO on and off take turns, so a pass "with GSO" really has it.
    static GSO_SWITCH: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    const WAIT: std::time::Duration = std::time::Duration::from_secs(2);

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    /// Receives until `want` datagrams arrived on `socket`: (source, destination, payload).
    async fn receive(
        rx: &mut Receiver,
        socket: &UdpSocket,
        want: usize,
    ) -> Vec<(SocketAddr, Option<IpAddr>, Vec<u8>)> {
        let mut got = Vec::new();
        let mut out = Datagrams::default();
        while got.len() < want {
            tokio::time::timeout(WAIT, rx.recv(socket, &mut out))
                .await
                .unwrap_or_else(|_| panic!("only {} of {want} datagrams arrived", got.len()))
                .expect("recv");
            got.extend(
                out.iter_with_destination()
                    .map(|(from, to, d)| (from, to, d.to_vec())),
            );
        }
        got
    }

    /// Sources of the next `want` datagrams on a plain client socket.
    async fn sources(socket: &UdpSocket, want: usize) -> Vec<SocketAddr> {
        let mut buf = vec![0u8; 2048];
        let mut from = Vec::new();
        while from.len() < want {
            let (_, source) = tokio::time::timeout(WAIT, socket.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("only {} of {want} replies arrived", from.len()))
                .expect("recv_from");
            from.push(source);
        }
        from
    }

    /// A client socket without GRO, so every datagram is read (and its source seen) alone.
    fn client(at: &str) -> UdpSocket {
        let socket = std::net::UdpSocket::bind(addr(at)).expect("bind client");
        socket.set_nonblocking(true).expect("nonblocking");
        UdpSocket::from_std(socket).expect("tokio socket")
    }

    fn burst(to: SocketAddr, src: Option<IpAddr>, count: usize, len: usize) -> Vec<Transmit> {
        (0..count)
            .map(|_| Transmit {
                to,
                src,
                payload: vec![9; len],
            })
            .collect()
    }

    #[test]
    fn plan_never_joins_datagrams_from_different_sources() {
        let mut q = vec![t("198.18.0.1:1", 100), t("198.18.0.1:1", 100)];
        q.extend(burst(addr("198.18.0.1:1"), Some(ip("198.18.0.9")), 2, 100));
        q.extend(burst(addr("198.18.0.1:1"), Some(ip("198.18.0.8")), 1, 100));
        let p = plan(&q, true);
        let shape: Vec<(usize, Option<IpAddr>)> = p.iter().map(|p| (p.count, p.src)).collect();
        assert_eq!(
            shape,
            vec![
                (2, None),
                (2, Some(ip("198.18.0.9"))),
                (1, Some(ip("198.18.0.8")))
            ]
        );
    }

    #[test]
    fn only_unicast_ipv4_destinations_are_reported() {
        // (header destination, specific destination the kernel computed)
        let info = |to: &str, spec: &str| {
            let raw = |a: &str| libc::in_addr {
                s_addr: u32::from(a.parse::<Ipv4Addr>().expect("ip")).to_be(),
            };
            libc::in_pktinfo {
                ipi_ifindex: 1,
                ipi_spec_dst: raw(spec),
                ipi_addr: raw(to),
            }
        };
        let unicast = Destination::Unicast(ip("192.0.2.1"));
        assert_eq!(ipv4_destination(&info("192.0.2.1", "192.0.2.1")), unicast);
        // No route to compute the specific destination from: the header address stands.
        assert_eq!(ipv4_destination(&info("192.0.2.1", "0.0.0.0")), unicast);
        // Broadcast (directed or limited) and multicast: the kernel answers for them with the
        // receiving interface's address, and no reply may come from them.
        for to in ["192.0.2.255", "255.255.255.255", "239.1.2.3"] {
            assert_eq!(
                ipv4_destination(&info(to, "192.0.2.1")),
                Destination::NotUnicast,
                "{to}"
            );
        }
    }

    #[test]
    fn control_buffers_have_room_for_everything_a_message_carries() {
        // What the kernel would write on receive / what we write on send, in libc's own sizes.
        // SAFETY: CMSG_SPACE only computes sizes.
        let (gro, gso, v4, v6) = unsafe {
            (
                libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) as usize,
                libc::CMSG_SPACE(size_of::<u16>() as u32) as usize,
                libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize,
                libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) as usize,
            )
        };
        assert!(RECV_CONTROL_WORDS * CONTROL_WORD >= gro + v4.max(v6));
        assert!(SEND_CONTROL_WORDS * CONTROL_WORD >= gso + v4.max(v6));
        let mut buf = [0u64; SEND_CONTROL_WORDS];
        let used = put_source(&mut buf, 0, ip("::1"));
        let used = put_cmsg(&mut buf, used, libc::SOL_UDP, UDP_SEGMENT, 1200u16);
        assert_eq!(used, v6 + gso);
    }

    fn t(to: &str, len: usize) -> Transmit {
        Transmit {
            to: to.parse().expect("addr"),
            src: None,
            payload: vec![7; len],
        }
    }

    #[test]
    fn plan_groups_same_destination_and_size() {
        let q = vec![
            t("198.18.0.1:1", 100),
            t("198.18.0.1:1", 100),
            t("198.18.0.1:1", 60),
            t("198.18.0.1:1", 100),
            t("198.18.0.2:1", 100),
        ];
        let p = plan(&q, true);
        let shape: Vec<(usize, usize)> = p.iter().map(|p| (p.count, p.segment)).collect();
        assert_eq!(shape, vec![(3, 100), (1, 100), (1, 100)]);
        assert_eq!(plan(&q, false).len(), 5);
    }

    #[test]
    fn plan_leaves_datagrams_larger_than_an_mtu_alone() {
        let q: Vec<Transmit> = (0..4).map(|_| t("198.18.0.1:1", 2000)).collect();
        assert!(plan(&q, true).iter().all(|p| p.count == 1));
    }

    #[test]
    fn plan_respects_segment_limits() {
        let q: Vec<Transmit> = (0..100).map(|_| t("198.18.0.1:1", 1200)).collect();
        let p = plan(&q, true);
        assert!(p.iter().all(|p| p.count * p.segment <= MAX_GSO_BYTES));
        assert_eq!(p.iter().map(|p| p.count).sum::<usize>(), 100);
    }

    #[tokio::test]
    async fn batch_round_trip_with_and_without_gso() {
        let _switch = GSO_SWITCH.lock().await;
        let receiver = crate::net::bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let sender = crate::net::bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let to = receiver.local_addr().expect("addr");
        let mut rx = Receiver::new(RECV_BATCH, 2048);
        for gso in [probe_gso(), false] {
            GSO_ENABLED.store(gso, Ordering::Relaxed);
            let mut queue: Vec<Transmit> = (0..10u8)
                .map(|i| Transmit {
                    to,
                    src: None,
                    payload: vec![i; if i == 9 { 50 } else { 200 }],
                })
                .collect();
            send_all(&sender, &mut queue).await;
            assert!(queue.is_empty());
            let mut got = Vec::new();
            let mut out = Datagrams::default();
            while got.len() < 10 {
                tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    rx.recv(&receiver, &mut out),
                )
                .await
                .expect("datagrams arrive")
                .expect("recv");
                // A socket bound to one address has no pktinfo to report.
                assert!(out.iter_with_destination().all(|(_, to, _)| to.is_none()));
                got.extend(out.iter().map(|(_, d)| d.to_vec()));
            }
            for (i, d) in got.iter().enumerate() {
                let len = if i == 9 { 50 } else { 200 };
                assert_eq!(d, &vec![i as u8; len], "gso={gso}");
            }
        }

        // A datagram the kernel refuses (port 0: EINVAL) is dropped alone; it says nothing
        // about GSO, which stays on for the run behind it.
        if probe_gso() {
            let nowhere: SocketAddr = "127.0.0.1:0".parse().expect("addr");
            let mut queue = vec![Transmit {
                to: nowhere,
                src: None,
                payload: vec![1; 100],
            }];
            queue.extend((0..3).map(|_| Transmit {
                to,
                src: None,
                payload: vec![2; 100],
            }));
            assert_eq!(send_all(&sender, &mut queue).await, 1);
            assert!(GSO_ENABLED.load(Ordering::Relaxed), "GSO was turned off");
            let mut got = 0;
            let mut out = Datagrams::default();
            while got < 3 {
                tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    rx.recv(&receiver, &mut out),
                )
                .await
                .expect("datagrams arrive")
                .expect("recv");
                got += out.len();
            }
            assert_eq!(got, 3);
        }
    }

    /// Two clients contact a 0.0.0.0 listener through 127.0.0.2 and 127.0.0.3 (all of 127/8
    /// is local): each datagram reports the address it was sent to, and replies sent with that
    /// source arrive from it, both as GSO runs and one by one.
    #[tokio::test]
    async fn wildcard_ipv4_listener_reports_and_answers_from_the_contacted_address() {
        let _switch = GSO_SWITCH.lock().await;
        let server = crate::net::bind_udp(addr("0.0.0.0:0")).expect("bind 0.0.0.0");
        let port = server.local_addr().expect("addr").port();
        let (a, b) = (client("127.0.0.1:0"), client("127.0.0.1:0"));
        let (via_a, via_b) = (
            SocketAddr::new(ip("127.0.0.2"), port),
            SocketAddr::new(ip("127.0.0.3"), port),
        );
        let mut rx = Receiver::new(RECV_BATCH, 2048);
        let gso_works = probe_gso();

        if gso_works {
            // A GSO burst reaches the GRO-enabled listener as one buffer: the receive carries
            // the UDP_GRO size and the pktinfo together, and both must fit.
            GSO_ENABLED.store(true, Ordering::Relaxed);
            let mut queue = burst(via_a, None, 4, 100);
            send_all(&a, &mut queue).await;
            tokio::time::timeout(WAIT, server.readable())
                .await
                .expect("burst arrives")
                .expect("readable");
            let n = rx.recv_now(server.as_raw_fd()).expect("recvmmsg");
            assert_eq!(n, 1, "one GRO buffer");
            assert_eq!(rx.headers[0].msg_len, 400);
            assert_eq!(rx.headers[0].msg_hdr.msg_flags & libc::MSG_CTRUNC, 0);
            let control = parse_control(&rx.headers[0].msg_hdr);
            assert_eq!(control.segment, Some(100));
            assert_eq!(control.to, Destination::Unicast(ip("127.0.0.2")));
        }

        for gso in [gso_works, false] {
            GSO_ENABLED.store(gso, Ordering::Relaxed);
            let mut queue = burst(via_a, None, 3, 120);
            send_all(&a, &mut queue).await;
            let mut queue = burst(via_b, None, 3, 120);
            send_all(&b, &mut queue).await;
            let got = receive(&mut rx, &server, 6).await;
            let (a_addr, b_addr) = (a.local_addr().expect("a"), b.local_addr().expect("b"));
            for (from, to, _) in &got {
                let expected = if *from == a_addr {
                    ip("127.0.0.2")
                } else {
                    assert_eq!(*from, b_addr);
                    ip("127.0.0.3")
                };
                assert_eq!(*to, Some(expected), "gso={gso}");
            }

            // Answer each datagram from where it went (runs of three per client), then two
            // more to client a from the other address: a run must not cross sources.
            let mut replies: Vec<Transmit> = got
                .iter()
                .map(|(from, to, d)| Transmit {
                    to: *from,
                    src: *to,
                    payload: d.clone(),
                })
                .collect();
            replies.extend(burst(a_addr, Some(ip("127.0.0.3")), 2, 120));
            assert_eq!(send_all(&server, &mut replies).await, 0, "gso={gso}");
            assert_eq!(
                sources(&a, 5).await,
                vec![via_a, via_a, via_a, via_b, via_b],
                "gso={gso}"
            );
            assert_eq!(sources(&b, 3).await, vec![via_b; 3], "gso={gso}");
        }
        GSO_ENABLED.store(gso_works, Ordering::Relaxed);
    }

    /// The same over IPv6 on [::] (v6-only): ::1 is the only loopback address, so this checks
    /// that it is reported and used as the source.
    #[tokio::test]
    async fn wildcard_ipv6_listener_reports_and_answers_from_the_contacted_address() {
        let _switch = GSO_SWITCH.lock().await;
        let server = crate::net::bind_udp(addr("[::]:0")).expect("bind [::]");
        let port = server.local_addr().expect("addr").port();
        let client = client("[::1]:0");
        let client_addr = client.local_addr().expect("addr");
        let via = SocketAddr::new(ip("::1"), port);
        let mut rx = Receiver::new(RECV_BATCH, 2048);
        let gso_works = probe_gso();
        for gso in [gso_works, false] {
            GSO_ENABLED.store(gso, Ordering::Relaxed);
            let mut queue = burst(via, None, 3, 150);
            send_all(&client, &mut queue).await;
            let got = receive(&mut rx, &server, 3).await;
            assert!(
                got.iter()
                    .all(|(from, to, _)| *from == client_addr && *to == Some(ip("::1"))),
                "gso={gso}: {got:?}"
            );
            let mut replies = burst(client_addr, Some(ip("::1")), 3, 150);
            assert_eq!(send_all(&server, &mut replies).await, 0, "gso={gso}");
            assert_eq!(sources(&client, 3).await, vec![via; 3], "gso={gso}");
        }
        GSO_ENABLED.store(gso_works, Ordering::Relaxed);
    }
}
