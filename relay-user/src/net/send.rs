//! Sending: a worker's queue of transmits, flushed socket by socket with `sendmmsg`.
//!
//! A transmit borrows its bytes: a range of the receive [`super::recv::Arena`] (relayed data,
//! sent where it was received) or a buffer the core built (responses, Data indications). At a
//! flush the queue is grouped by socket (order kept within a socket); consecutive transmits to
//! one destination with the same size become one UDP GSO message whose iovecs point at the
//! datagrams where they lie (adjacent ones merged); everything else goes as plain messages of
//! the same `sendmmsg` call. Message headers, iovecs, addresses and control space are
//! allocated once, for the largest call.
//!
//! A full socket buffer is waited for briefly, then the rest for that socket is dropped; a
//! datagram the kernel refuses is dropped (UDP promises no delivery). A GSO run the kernel
//! refuses is sent again datagram by datagram; only EIO, which says the device cannot segment,
//! turns GSO off for the whole relay.
//!
//! With many allocations each relay socket has one or two datagrams per flush, so this is one
//! `sendmmsg` per socket. io_uring could submit the sends of every socket in one call; measured
//! on this project's machines (Linux 6.18, 1000 UDP sockets each sending one 120 B datagram per
//! round on loopback, pinned to one core): `sendmmsg` per socket 892-904 ns per datagram, one
//! io_uring submission of 1000 IORING_OP_SENDMSG 916-1115 ns. The per-datagram work is the
//! kernel's UDP send, not the system call, so `sendmmsg` stays.
//!
//! Sending the datagrams of many relay sockets through one raw socket (one `sendmmsg` of
//! datagrams with different source ports, the relay sockets kept for receiving) was measured
//! too, same machine, 1000 ports x one 120 B datagram, per datagram: UDP `sendto` per socket
//! 584 ns, one-message `sendmmsg` per socket 644 ns; IPPROTO_RAW with IP_HDRINCL 822-950 ns to
//! an on-link peer (a header-included send gets a route of its own per datagram, allocated and
//! freed each time: dst_destroy, the uncached-route list lock) and 521 ns through a gateway;
//! an IPPROTO_UDP raw socket with IP_PKTINFO sources 626-739 ns. No better where peers are
//! on-link, slower there, and it would need our own checksums, MTU handling and IPv6 twin:
//! not used. A connected UDP socket sends in 553-658 ns, but only receives from its one peer.

use std::{
    io,
    mem::zeroed,
    net::{IpAddr, SocketAddr},
    os::fd::RawFd,
};

use tracing::debug;

use super::batch::{
    disable_gso, gso_enabled, put_cmsg, put_source, to_storage, SEND_CONTROL_WORDS, UDP_SEGMENT,
};

/// Messages per `sendmmsg` call.
const SEND_BATCH: usize = 64;
/// Most segments the kernel takes in one GSO send (UDP_MAX_SEGMENTS).
const MAX_GSO_SEGMENTS: usize = 64;
/// Largest GSO super-datagram (an IP datagram carries at most 64 KiB).
const MAX_GSO_BYTES: usize = 65_000;
/// Largest segment grouped for GSO: a UDP payload that fits a 1500-byte MTU over IPv6. Larger
/// datagrams would make the whole run fail with EMSGSIZE where plain sends just fragment.
const MAX_GSO_SEGMENT: usize = 1452;
/// iovecs of one call: every transmit of a full batch of full GSO runs.
const MAX_IOVECS: usize = SEND_BATCH * MAX_GSO_SEGMENTS;
/// How long a flush waits for a full socket buffer before dropping what is left: one slow
/// socket must not stall the worker's other sockets, timers and admin requests for long.
const WRITABLE_WAIT_MS: libc::c_int = 10;

/// Where a transmit's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bytes {
    /// A range of the receive arena.
    Arena { start: usize, len: usize },
    /// Buffer `index` of the queue's owned buffers.
    Owned { index: usize },
}

/// One outgoing datagram.
#[derive(Clone, Copy, Debug)]
pub struct Transmit {
    /// The worker's name for the socket to send from (with its generation, so a socket closed
    /// since is noticed).
    pub socket: u64,
    pub to: SocketAddr,
    /// The source address it must leave from, on a socket bound to a wildcard address; `None`
    /// lets the socket's own address (or, on a wildcard socket, the route) decide.
    pub src: Option<IpAddr>,
    pub bytes: Bytes,
    /// Queue position, which keeps a socket's datagrams in order when the queue is grouped.
    seq: u32,
}

/// The transmits of one worker, and the arrays `sendmmsg` is called with.
pub struct SendQueue {
    queue: Vec<Transmit>,
    owned: Vec<Vec<u8>>,
    headers: Vec<libc::mmsghdr>,
    iovecs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    control: Vec<u64>,
    /// For each message of the call being built: how many transmits it carries.
    counts: Vec<usize>,
}

impl Default for SendQueue {
    fn default() -> Self {
        // SAFETY: mmsghdr, iovec and sockaddr_storage are plain C structs for which all-zero
        // bytes are a valid (empty) value.
        let (hdr, iov, addr) = unsafe {
            (
                zeroed::<libc::mmsghdr>(),
                zeroed::<libc::iovec>(),
                zeroed::<libc::sockaddr_storage>(),
            )
        };
        Self {
            queue: Vec::with_capacity(4096),
            owned: Vec::new(),
            headers: vec![hdr; SEND_BATCH],
            iovecs: vec![iov; MAX_IOVECS],
            addrs: vec![addr; SEND_BATCH],
            control: vec![0; SEND_BATCH * SEND_CONTROL_WORDS],
            counts: Vec::with_capacity(SEND_BATCH),
        }
    }
}

impl SendQueue {
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queues `len` bytes at `start` of the arena.
    pub fn push_arena(
        &mut self,
        socket: u64,
        to: SocketAddr,
        src: Option<IpAddr>,
        start: usize,
        len: usize,
    ) {
        self.push(socket, to, src, Bytes::Arena { start, len });
    }

    /// Queues a buffer of its own (control-plane messages).
    pub fn push_owned(&mut self, socket: u64, to: SocketAddr, src: Option<IpAddr>, data: Vec<u8>) {
        let index = self.owned.len();
        self.owned.push(data);
        self.push(socket, to, src, Bytes::Owned { index });
    }

    fn push(&mut self, socket: u64, to: SocketAddr, src: Option<IpAddr>, bytes: Bytes) {
        let seq = u32::try_from(self.queue.len()).unwrap_or(u32::MAX);
        self.queue.push(Transmit {
            socket,
            to,
            src,
            bytes,
            seq,
        });
    }

    /// Sends everything queued and empties the queue; `fd_of` names the descriptor of a
    /// socket (None: closed since, its transmits are dropped). Returns how many datagrams were
    /// dropped.
    pub fn flush(&mut self, arena: &[u8], mut fd_of: impl FnMut(u64) -> Option<RawFd>) -> usize {
        // Unstable sort on a unique key: no allocation, and order within a socket is kept.
        self.queue.sort_unstable_by_key(|t| (t.socket, t.seq));
        let mut dropped = 0;
        let mut first = 0;
        while first < self.queue.len() {
            let socket = self.queue[first].socket;
            let end = first
                + self.queue[first..]
                    .iter()
                    .position(|t| t.socket != socket)
                    .unwrap_or(self.queue.len() - first);
            match fd_of(socket) {
                Some(fd) => dropped += self.send_socket(fd, first..end, arena),
                None => {
                    debug!(dropped = end - first, "socket closed before sending");
                    dropped += end - first;
                }
            }
            first = end;
        }
        self.queue.clear();
        self.owned.clear();
        dropped
    }

    fn bytes(&self, arena: &[u8], t: &Transmit) -> (*const u8, usize) {
        let slice: &[u8] = match t.bytes {
            Bytes::Arena { start, len } => arena.get(start..start + len).unwrap_or_default(),
            Bytes::Owned { index } => self.owned.get(index).map(Vec::as_slice).unwrap_or_default(),
        };
        (slice.as_ptr(), slice.len())
    }

    fn len_of(&self, t: &Transmit) -> usize {
        match t.bytes {
            Bytes::Arena { len, .. } => len,
            Bytes::Owned { index } => self.owned.get(index).map_or(0, Vec::len),
        }
    }

    /// Sends the transmits `range` of the queue (all for `fd`); returns how many it dropped.
    fn send_socket(&mut self, fd: RawFd, range: std::ops::Range<usize>, arena: &[u8]) -> usize {
        let mut done = range.start;
        let mut dropped = 0;
        // Transmits before this index go out without segmentation (a refused run, retried).
        let mut plain_until = done;
        let mut waited = false;
        while done < range.end {
            let gso = gso_enabled() && done >= plain_until;
            let messages = self.build(done..range.end, gso, arena);
            let n = self.send_messages(fd, messages);
            if n >= 0 {
                let sent: usize = self.counts.iter().take(n as usize).sum();
                done += sent.max(1);
                continue;
            }
            let error = io::Error::last_os_error();
            let first_run = self.counts.first().copied().unwrap_or(1);
            if error.kind() == io::ErrorKind::WouldBlock {
                if !waited && writable(fd) {
                    waited = true;
                    continue;
                }
                debug!(
                    dropped = range.end - done,
                    "socket buffer full; datagrams dropped"
                );
                dropped += range.end - done;
                break;
            } else if first_run > 1 {
                if error.raw_os_error() == Some(libc::EIO) {
                    disable_gso(&error);
                }
                debug!(%error, segments = first_run, "GSO send refused; sending one by one");
                plain_until = done + first_run;
            } else if error.kind() != io::ErrorKind::Interrupted {
                // The first message was refused (e.g. EPERM, ENETUNREACH, EMSGSIZE): skip it.
                debug!(to = %self.queue[done].to, %error, "send failed; datagram dropped");
                dropped += 1;
                done += 1;
            }
        }
        dropped
    }

    /// Sends the first `messages` messages [`SendQueue::build`] prepared; what `sendmmsg`
    /// returns (messages sent, or -1 with errno set). One message, the common case with many
    /// allocations (each relay socket has one datagram per flush), goes with `sendto` (or
    /// `sendmsg` when it carries control data): measured on Linux 6.18, 1000 UDP sockets
    /// sending one 120 B datagram each, `sendto` costs 584 ns per datagram against 644 ns for
    /// a one-message `sendmmsg`, which copies and walks an mmsghdr array.
    fn send_messages(&mut self, fd: RawFd, messages: usize) -> isize {
        let single = messages == 1;
        let hdr = &self.headers[0].msg_hdr;
        if single && hdr.msg_iovlen == 1 && hdr.msg_controllen == 0 {
            let iov = &self.iovecs[0];
            // SAFETY: the iovec points at `iov_len` bytes of `arena` or `owned` and msg_name at
            // a sockaddr_storage of this struct holding msg_namelen valid bytes; all alive and
            // unchanged until the call returns.
            let rc = unsafe {
                libc::sendto(
                    fd,
                    iov.iov_base,
                    iov.iov_len,
                    libc::MSG_DONTWAIT,
                    hdr.msg_name.cast::<libc::sockaddr>(),
                    hdr.msg_namelen,
                )
            };
            return if rc < 0 { -1 } else { 1 };
        }
        if single {
            // SAFETY: as below, for the first header only.
            let rc = unsafe { libc::sendmsg(fd, hdr, libc::MSG_DONTWAIT) };
            return if rc < 0 { -1 } else { 1 };
        }
        // SAFETY: the first `messages` headers point at iovecs into `arena` or `owned`, at
        // addresses and control space of this struct, all alive and unchanged until the call
        // returns; lengths match the buffers.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                self.headers.as_mut_ptr(),
                messages as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        n as isize
    }

    /// Fills the call's arrays with messages for the transmits in `range` (runs of equal-size
    /// datagrams to one destination and source as GSO messages when `gso`); returns how many
    /// messages, and leaves in `counts` how many transmits each carries.
    fn build(&mut self, range: std::ops::Range<usize>, gso: bool, arena: &[u8]) -> usize {
        self.counts.clear();
        let mut iov = 0;
        let mut i = range.start;
        while i < range.end && self.counts.len() < SEND_BATCH && iov < MAX_IOVECS {
            let head = self.queue[i];
            let segment = self.len_of(&head);
            let m = self.counts.len();
            let first_iov = iov;
            let mut count = 0;
            let mut total = 0;
            let mut last_end: Option<*const u8> = None;
            while i < range.end && iov < MAX_IOVECS {
                let t = self.queue[i];
                let len = self.len_of(&t);
                if count > 0 {
                    // A run continues with the same destination and source, datagrams of the
                    // first one's size (the last may be shorter, which ends it).
                    let prev_len = self.len_of(&self.queue[i - 1]);
                    let joins = gso
                        && t.to == head.to
                        && t.src == head.src
                        && segment <= MAX_GSO_SEGMENT
                        && prev_len == segment
                        && len <= segment
                        && len > 0
                        && count < MAX_GSO_SEGMENTS
                        && total + len <= MAX_GSO_BYTES;
                    if !joins {
                        break;
                    }
                }
                let (ptr, len) = self.bytes(arena, &t);
                if last_end == Some(ptr) && iov > first_iov {
                    // Right behind the previous datagram: one iovec for both.
                    self.iovecs[iov - 1].iov_len += len;
                } else {
                    self.iovecs[iov] = libc::iovec {
                        iov_base: ptr.cast_mut().cast(),
                        iov_len: len,
                    };
                    iov += 1;
                }
                last_end = Some(ptr.wrapping_add(len));
                count += 1;
                total += len;
                i += 1;
            }
            let (name, name_len) = to_storage(head.to);
            self.addrs[m] = name;
            let space = &mut self.control[m * SEND_CONTROL_WORDS..(m + 1) * SEND_CONTROL_WORDS];
            let mut used = 0;
            if let Some(src) = head.src {
                used = put_source(space, used, src);
            }
            if count > 1 {
                used = put_cmsg(space, used, libc::SOL_UDP, UDP_SEGMENT, segment as u16);
            }
            let hdr = &mut self.headers[m].msg_hdr;
            hdr.msg_name = (&mut self.addrs[m] as *mut libc::sockaddr_storage).cast();
            hdr.msg_namelen = name_len;
            hdr.msg_iov = &mut self.iovecs[first_iov];
            hdr.msg_iovlen = iov - first_iov;
            hdr.msg_control = if used > 0 {
                space.as_mut_ptr().cast()
            } else {
                std::ptr::null_mut()
            };
            hdr.msg_controllen = if used > 0 { used } else { 0 };
            hdr.msg_flags = 0;
            self.headers[m].msg_len = 0;
            self.counts.push(count);
        }
        self.counts.len()
    }
}

/// Waits up to [`WRITABLE_WAIT_MS`] for `fd` to take more; whether it will.
fn writable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, WRITABLE_WAIT_MS) };
    n == 1 && pfd.revents & libc::POLLOUT != 0
}

#[cfg(test)]
impl SendQueue {
    /// (transmits, segment size) of each message a flush of the whole queue would send first.
    pub(super) fn plan(&mut self, gso: bool, arena: &[u8]) -> Vec<(usize, usize)> {
        self.queue.sort_unstable_by_key(|t| (t.socket, t.seq));
        let n = self.build(0..self.queue.len(), gso, arena);
        (0..n)
            .map(|m| {
                let first: usize = self.counts[..m].iter().sum();
                (self.counts[m], self.len_of(&self.queue[first]))
            })
            .collect()
    }

    /// iovecs of message `m` of the last [`SendQueue::plan`].
    pub(super) fn iovecs_of(&self, m: usize) -> usize {
        self.headers[m].msg_hdr.msg_iovlen
    }
}
