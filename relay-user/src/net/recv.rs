//! Receiving: `recvmmsg` from any of a worker's sockets into one worker-owned arena of slots.
//!
//! A slot holds one received message (a datagram, or a UDP GRO aggregate of several) behind
//! [`HEADROOM`] free bytes, so the ChannelData header of a peer's datagram (RFC 8656 §12.6) is
//! written in front of it in place and the datagram goes to the client without a copy. Slots
//! stay filled until the worker has sent what it queued from them, so a wake can read from
//! many sockets (with many allocations, each relay socket holds one or two datagrams) and send
//! everything in one flush. All buffers, headers and control space are allocated once.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, SocketAddr},
    ops::Range,
    os::fd::RawFd,
};

use tracing::debug;

use super::batch::{parse_control, to_socket_addr, Destination, CONTROL_WORD, RECV_CONTROL_WORDS};

/// Free bytes in front of every received message: room for a ChannelData header.
pub const HEADROOM: usize = relay_proto::channel_data::CHANNEL_DATA_HEADER_LEN;
/// Messages per `recvmmsg` call at most.
pub const RECV_BATCH: usize = 32;

/// One received datagram in the arena.
#[derive(Clone, Copy, Debug)]
pub struct Datagram {
    pub from: SocketAddr,
    /// The local address it was sent to, when the socket reports it (wildcard listeners).
    pub to: Option<IpAddr>,
    /// Where its bytes lie in [`Arena::bytes`].
    pub start: usize,
    pub len: usize,
    /// Whether the [`HEADROOM`] bytes before it are free to write (not so for the second and
    /// later datagrams of a GRO aggregate, which follow the previous one directly).
    pub headroom: bool,
}

impl Datagram {
    pub fn range(&self) -> Range<usize> {
        self.start..self.start + self.len
    }
}

/// Receive slots shared by every socket of one worker.
pub struct Arena {
    /// Bytes per slot, headroom included.
    slot: usize,
    slots: usize,
    /// Slots filled since the last [`Arena::clear`].
    used: usize,
    buf: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    control: Vec<u64>,
}

impl Arena {
    /// `slots` slots for datagrams of up to `max_datagram` bytes. Pages are only touched when
    /// a datagram lands in them, so large slots cost address space, not memory.
    pub fn new(slots: usize, max_datagram: usize) -> Self {
        let slot = (HEADROOM + max_datagram).next_multiple_of(CONTROL_WORD);
        // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for which all-zero
        // bytes are a valid (empty) value.
        let (addr, iov, hdr) = unsafe {
            (
                zeroed::<libc::sockaddr_storage>(),
                zeroed::<libc::iovec>(),
                zeroed::<libc::mmsghdr>(),
            )
        };
        let batch = RECV_BATCH.min(slots);
        Self {
            slot,
            slots,
            used: 0,
            buf: vec![0; slots * slot],
            addrs: vec![addr; batch],
            iovecs: vec![iov; batch],
            headers: vec![hdr; batch],
            control: vec![0; batch * RECV_CONTROL_WORDS],
        }
    }

    /// Slots still free for [`Arena::recv`].
    pub fn free(&self) -> usize {
        self.slots - self.used
    }

    /// Forgets every received datagram (after the worker sent what it queued from them).
    pub fn clear(&mut self) {
        self.used = 0;
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Writes `header` into the headroom of `datagram`; the datagram with its header is then
    /// `datagram.start - HEADROOM..datagram.start + datagram.len`. False if it has none.
    pub fn prepend(&mut self, datagram: &Datagram, header: [u8; HEADROOM]) -> bool {
        if !datagram.headroom || datagram.start < HEADROOM {
            return false;
        }
        match self.buf.get_mut(datagram.start - HEADROOM..datagram.start) {
            Some(room) => {
                room.copy_from_slice(&header);
                true
            }
            None => false,
        }
    }

    /// One non-blocking `recvmmsg` on `fd` into free slots; appends what arrived to `out`
    /// (GRO aggregates split into their datagrams) and returns how many messages it read.
    /// `WouldBlock` when nothing is waiting. Truncated messages are dropped.
    pub fn recv(&mut self, fd: RawFd, out: &mut Vec<Datagram>) -> io::Result<usize> {
        let batch = self.headers.len().min(self.free());
        if batch == 0 {
            return Ok(0);
        }
        let first = self.used;
        for i in 0..batch {
            let at = (first + i) * self.slot + HEADROOM;
            self.iovecs[i] = libc::iovec {
                iov_base: self.buf[at..].as_mut_ptr().cast(),
                iov_len: self.slot - HEADROOM,
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
        // SAFETY: each of the first `batch` headers points at a live iovec into a free slot of
        // `buf` (slot - HEADROOM bytes, inside the Vec), at a sockaddr_storage and at a control
        // buffer, each with its real size; the kernel writes at most that.
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
        let n = (n as usize).min(batch);
        self.used += n;
        for i in 0..n {
            self.collect(i, first + i, out);
        }
        Ok(n)
    }

    /// Appends the datagrams of message `i` of the last call, which landed in slot `slot`.
    fn collect(&self, i: usize, slot: usize, out: &mut Vec<Datagram>) {
        let header = &self.headers[i];
        if header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
            debug!(
                slot = self.slot,
                "dropped a datagram larger than the receive slot"
            );
            return;
        }
        let Some(from) = to_socket_addr(&self.addrs[i]) else {
            return;
        };
        if header.msg_hdr.msg_flags & libc::MSG_CTRUNC != 0 {
            // Cannot happen with the buffer sized for it; if it did, the destination may be
            // missing and a wildcard listener drops the datagram rather than guess.
            debug!("control data of a received datagram truncated");
        }
        let control = parse_control(&header.msg_hdr);
        let to = match control.to {
            Destination::Unicast(ip) => Some(ip),
            Destination::Unknown => None,
            Destination::NotUnicast => {
                // A broadcast or multicast datagram reached a wildcard listener: no answer can
                // come from the address it was sent to, and TURN is unicast only.
                debug!(%from, "dropped a datagram not sent to a unicast address");
                return;
            }
        };
        let len = (header.msg_len as usize).min(self.slot - HEADROOM);
        let start = slot * self.slot + HEADROOM;
        // A GRO aggregate holds datagrams of `segment` bytes (the last may be shorter).
        let segment = control.segment.filter(|s| *s > 0).unwrap_or(len).max(1);
        let mut at = 0;
        loop {
            let part = segment.min(len - at);
            out.push(Datagram {
                from,
                to,
                start: start + at,
                len: part,
                headroom: at == 0,
            });
            at += part;
            if at >= len {
                break;
            }
        }
    }
}
