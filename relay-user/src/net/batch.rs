//! Batched UDP on Linux: `recvmmsg` for receiving, `sendmmsg` with UDP GSO (`UDP_SEGMENT`)
//! for sending.
//!
//! Sending groups consecutive datagrams that share destination and size (the last of a run may
//! be shorter) into one GSO super-datagram; everything else goes out as plain messages of the
//! same `sendmmsg` call. GSO support is probed once; an EIO/EINVAL from a GSO send turns it off
//! for good with one log line (drivers without checksum offload refuse it).

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
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

/// Room for the one control message a receive can carry (the UDP_GRO segment size).
fn gro_cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) as usize }
}

static GSO_ENABLED: AtomicBool = AtomicBool::new(false);

/// Sets a SOL_UDP option to an int value; whether the kernel took it.
fn set_udp_option(socket: &impl AsRawFd, option: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: setsockopt reads one c_int through a valid pointer with the matching length;
    // the fd is open for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            option,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
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

/// Received datagrams: one contiguous buffer plus (source, range) per datagram.
#[derive(Debug, Default)]
pub struct Datagrams {
    pub data: Vec<u8>,
    pub items: Vec<(SocketAddr, std::ops::Range<usize>)>,
}

impl Datagrams {
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.items
            .iter()
            .map(|(from, range)| (*from, self.data.get(range.clone()).unwrap_or_default()))
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
    /// One control buffer per slot, for the UDP_GRO segment size.
    control: Vec<u8>,
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
            control: vec![0; batch * gro_cmsg_space()],
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
            let space = gro_cmsg_space();
            hdr.msg_control = self.control[i * space..].as_mut_ptr().cast();
            hdr.msg_controllen = space;
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
            let len = (header.msg_len as usize).min(self.slot);
            let start = out.data.len();
            out.data.extend_from_slice(
                self.bufs
                    .get(i * self.slot..i * self.slot + len)
                    .unwrap_or_default(),
            );
            // A GRO buffer holds datagrams of `segment` bytes (the last may be shorter).
            let segment = gro_segment(&header.msg_hdr)
                .filter(|s| *s > 0)
                .unwrap_or(len);
            let mut at = start;
            while at < start + len {
                let end = (at + segment).min(start + len);
                out.items.push((from, at..end));
                at = end;
            }
            if len == 0 {
                out.items.push((from, start..start));
            }
        }
    }
}

/// The UDP_GRO segment size of a received message, if the kernel coalesced datagrams.
fn gro_segment(hdr: &libc::msghdr) -> Option<usize> {
    if hdr.msg_control.is_null() || hdr.msg_controllen < size_of::<libc::cmsghdr>() {
        return None;
    }
    // SAFETY: `hdr` is a message header the kernel just filled: msg_control points at our
    // control buffer of msg_controllen valid bytes, which the CMSG_* macros stay within.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                return usize::try_from(size).ok();
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    None
}

impl Receiver {}

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
    pub payload: Vec<u8>,
}

/// A message as `sendmmsg` will see it: a plain datagram, or a GSO run.
struct Planned {
    to: SocketAddr,
    /// Index range into the transmit queue.
    first: usize,
    count: usize,
    /// Segment size when `count > 1`.
    segment: usize,
}

/// Splits the queue into messages: runs of same-destination, same-size datagrams become one
/// GSO message (the last of a run may be shorter), the rest stay single.
fn plan(queue: &[Transmit], gso: bool) -> Vec<Planned> {
    let mut plan: Vec<Planned> = Vec::new();
    for (i, t) in queue.iter().enumerate() {
        if gso {
            if let Some(last) = plan.last_mut() {
                let prev = &queue[last.first + last.count - 1];
                let total = last.segment * last.count + t.payload.len();
                // A shorter datagram ends the run; equal sizes continue it.
                if last.to == t.to
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
    // SAFETY: CMSG_SPACE only computes a size.
    let cmsg_space = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
    let mut control = vec![0u8; cmsg_space * planned.len()];
    // SAFETY: all-zero bytes are a valid mmsghdr.
    let mut headers: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; planned.len()];
    for (i, p) in planned.iter().enumerate() {
        let hdr = &mut headers[i].msg_hdr;
        hdr.msg_name = (&addrs[i].0 as *const libc::sockaddr_storage)
            .cast_mut()
            .cast();
        hdr.msg_namelen = addrs[i].1;
        hdr.msg_iov = &mut iovecs[i];
        hdr.msg_iovlen = 1;
        if p.count > 1 {
            let space = &mut control[i * cmsg_space..(i + 1) * cmsg_space];
            hdr.msg_control = space.as_mut_ptr().cast();
            hdr.msg_controllen = cmsg_space;
            // SAFETY: msg_control points at `cmsg_space` zeroed bytes, room for exactly one
            // cmsg carrying a u16, so CMSG_FIRSTHDR is non-null and CMSG_DATA is in bounds.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(hdr);
                (*cmsg).cmsg_level = libc::SOL_UDP;
                (*cmsg).cmsg_type = UDP_SEGMENT;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), p.segment as u16);
            }
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

    fn t(to: &str, len: usize) -> Transmit {
        Transmit {
            to: to.parse().expect("addr"),
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
        let receiver = crate::net::bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let sender = crate::net::bind_udp("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let to = receiver.local_addr().expect("addr");
        let mut rx = Receiver::new(RECV_BATCH, 2048);
        for gso in [probe_gso(), false] {
            GSO_ENABLED.store(gso, Ordering::Relaxed);
            let mut queue: Vec<Transmit> = (0..10u8)
                .map(|i| Transmit {
                    to,
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
                payload: vec![1; 100],
            }];
            queue.extend((0..3).map(|_| Transmit {
                to,
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
}
