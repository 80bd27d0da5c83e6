//! The bench's `reference` path (`cargo xtask bench-forwarder`, hidden): a minimal userspace
//! forwarder doing only what the relay's socket path must do per client→peer datagram, with no
//! TURN logic. One UDP socket on the listener address (UDP_GRO on), one on a relayed address;
//! recvmmsg batches from the listener, each received message split by its UDP_GRO segment size,
//! each segment checked as ChannelData (first two bits 0b01, length fits the datagram with 0-3
//! padding bytes) and stripped of its 4-byte header; the payloads go to the one peer from the
//! relayed socket with sendmmsg, consecutive equal-size payloads as one UDP GSO send (a
//! UDP_SEGMENT control message), GSO turned off for good if the kernel refuses it.
//!
//! No allocation lookup, permissions, channel table, counters per allocation or the reverse
//! direction: it measures the floor the socket path's I/O costs on this machine.

use std::{
    mem::{size_of, zeroed},
    net::{SocketAddrV4, UdpSocket},
    os::fd::AsRawFd,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct ForwarderArgs {
    /// Address the ChannelData arrives on.
    #[arg(long)]
    listen: SocketAddrV4,
    /// Address the payloads leave from.
    #[arg(long)]
    relayed: SocketAddrV4,
    /// Where the payloads go.
    #[arg(long)]
    peer: SocketAddrV4,
    /// Exit after this many seconds (or at SIGTERM/SIGINT).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Where to write the final counters (also printed on stderr).
    #[arg(long, value_name = "PATH")]
    stats_file: Option<std::path::PathBuf>,
}

/// Messages per recvmmsg (the relay's listener batch).
const BATCH: usize = 32;
/// One received message: up to a whole GRO-coalesced 64 KB datagram.
const SLOT: usize = 65_535;
/// The kernel coalesces at most 64 datagrams per GRO message; anything beyond is dropped.
const MAX_PAYLOADS: usize = BATCH * 64;
/// UDP GSO limits: segments per send and bytes per send.
const MAX_GSO_SEGMENTS: usize = 64;
const MAX_GSO_BYTES: usize = 65_000;
/// linux/udp.h.
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// The relay's socket buffers (relay-user/src/net/mod.rs).
const SOCKET_BUFFER_BYTES: libc::c_int = 4 << 20;
/// How long one blocking recvmmsg may wait, so the deadline is checked.
const RECV_TIMEOUT: Duration = Duration::from_millis(100);
/// Room for one int-sized control message (CMSG_SPACE(4) is 24 on 64-bit Linux), as u64s for
/// the cmsghdr alignment.
const CTRL_WORDS: usize = 4;

#[derive(Default, Debug)]
struct Stats {
    messages: u64,
    datagrams: u64,
    invalid: u64,
    forwarded: u64,
    send_calls: u64,
    send_errors: u64,
    overflow: u64,
}

pub fn run(args: &ForwarderArgs) -> anyhow::Result<()> {
    let listener = UdpSocket::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    let relayed =
        UdpSocket::bind(args.relayed).with_context(|| format!("bind {}", args.relayed))?;
    for s in [&listener, &relayed] {
        setsockopt_int(s, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_BUFFER_BYTES)?;
        setsockopt_int(s, libc::SOL_SOCKET, libc::SO_SNDBUF, SOCKET_BUFFER_BYTES)?;
    }
    let gro = setsockopt_int(&listener, libc::SOL_UDP, UDP_GRO, 1).is_ok();
    listener.set_read_timeout(Some(RECV_TIMEOUT))?;
    let mut fwd = Forwarder::new(args.peer);
    eprintln!(
        "reference forwarder listening on udp {} (gro {gro}), relayed {} -> peer {}",
        args.listen, args.relayed, args.peer
    );
    super::lab::install_signal_handlers();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds.clamp(1, 3600));
    // Bounded in time (each recvmmsg waits at most RECV_TIMEOUT) and in count.
    let max_iterations = args.seconds.clamp(1, 3600) * 10_000_000;
    let mut stats = Stats::default();
    for _ in 0..max_iterations {
        if Instant::now() >= deadline || super::lab::STOP.load(Ordering::Relaxed) {
            break;
        }
        let n = fwd.receive(&listener)?;
        if n == 0 {
            continue;
        }
        fwd.parse(n, &mut stats);
        fwd.send(&relayed, &mut stats);
    }
    let summary = format!(
        "reference forwarder done after {:.1} s: {stats:?}, gro {gro}, gso {}",
        started.elapsed().as_secs_f64(),
        fwd.gso
    );
    eprintln!("{summary}");
    if let Some(path) = &args.stats_file {
        std::fs::write(path, summary + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn setsockopt_int(
    socket: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> anyhow::Result<()> {
    // SAFETY: the fd is a live socket we own; the option value is a c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setsockopt({level}, {name})"));
    }
    Ok(())
}

/// Preallocated receive and send state; the send side points into the receive buffers.
struct Forwarder {
    bufs: Vec<u8>,
    rx_iov: Vec<libc::iovec>,
    rx_hdr: Vec<libc::mmsghdr>,
    rx_ctrl: Vec<[u64; CTRL_WORDS]>,
    rx_from: Vec<libc::sockaddr_in>,
    /// (offset into bufs, length) of each payload of the current batch.
    payloads: Vec<(usize, usize)>,
    tx_iov: Vec<libc::iovec>,
    tx_hdr: Vec<libc::mmsghdr>,
    tx_ctrl: Vec<[u64; CTRL_WORDS]>,
    /// Index into `payloads` of each send's first payload.
    tx_first: Vec<usize>,
    peer: libc::sockaddr_in,
    gso: bool,
}

impl Forwarder {
    fn new(peer: SocketAddrV4) -> Self {
        // SAFETY: all-zero is a valid value of these plain C structs (null pointers, zero
        // lengths); every pointer is set before a syscall reads it.
        let (iov, hdr, sin): (libc::iovec, libc::mmsghdr, libc::sockaddr_in) =
            unsafe { (zeroed(), zeroed(), zeroed()) };
        let mut peer_addr = sin;
        peer_addr.sin_family = libc::AF_INET as libc::sa_family_t;
        peer_addr.sin_port = peer.port().to_be();
        peer_addr.sin_addr.s_addr = u32::from_ne_bytes(peer.ip().octets());
        Self {
            bufs: vec![0; BATCH * SLOT],
            rx_iov: vec![iov; BATCH],
            rx_hdr: vec![hdr; BATCH],
            rx_ctrl: vec![[0; CTRL_WORDS]; BATCH],
            rx_from: vec![sin; BATCH],
            payloads: Vec::with_capacity(MAX_PAYLOADS),
            tx_iov: vec![iov; MAX_PAYLOADS],
            tx_hdr: vec![hdr; MAX_PAYLOADS],
            tx_ctrl: vec![[0; CTRL_WORDS]; MAX_PAYLOADS],
            tx_first: Vec::with_capacity(MAX_PAYLOADS),
            peer: peer_addr,
            gso: true,
        }
    }

    /// One recvmmsg (blocking until one message, at most RECV_TIMEOUT); 0 on timeout.
    fn receive(&mut self, socket: &UdpSocket) -> anyhow::Result<usize> {
        let base = self.bufs.as_mut_ptr();
        for i in 0..BATCH {
            // SAFETY: i * SLOT + SLOT <= bufs.len(), so the slot is inside the buffer.
            self.rx_iov[i].iov_base = unsafe { base.add(i * SLOT) }.cast();
            self.rx_iov[i].iov_len = SLOT;
            let h = &mut self.rx_hdr[i].msg_hdr;
            h.msg_iov = &mut self.rx_iov[i];
            h.msg_iovlen = 1;
            // The source address: the relay needs it per datagram to find the allocation.
            h.msg_name = std::ptr::from_mut(&mut self.rx_from[i]).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_control = self.rx_ctrl[i].as_mut_ptr().cast();
            h.msg_controllen = CTRL_WORDS * 8;
            h.msg_flags = 0;
            self.rx_hdr[i].msg_len = 0;
        }
        // SAFETY: rx_hdr holds BATCH headers whose iovecs, names and control buffers point
        // into buffers owned by self that outlive the call and are not otherwise borrowed.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.rx_hdr.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e).context("recvmmsg"),
            };
        }
        Ok(n as usize)
    }

    /// Splits the `n` received messages by their GRO segment size and keeps the payloads of
    /// valid ChannelData segments.
    fn parse(&mut self, n: usize, stats: &mut Stats) {
        self.payloads.clear();
        stats.messages += n as u64;
        for i in 0..n {
            let len = (self.rx_hdr[i].msg_len as usize).min(SLOT);
            let segment = gro_segment(&self.rx_hdr[i].msg_hdr)
                .filter(|s| *s > 0)
                .unwrap_or(len)
                .max(1);
            let slot = &self.bufs[i * SLOT..i * SLOT + len];
            for (k, seg) in slot.chunks(segment).enumerate() {
                stats.datagrams += 1;
                let Some(payload_len) = channel_data_payload(seg) else {
                    stats.invalid += 1;
                    continue;
                };
                if self.payloads.len() == MAX_PAYLOADS {
                    stats.overflow += 1;
                    continue;
                }
                self.payloads
                    .push((i * SLOT + k * segment + 4, payload_len));
            }
        }
    }

    /// Sends the batch's payloads to the peer; returns after every send was tried once (after
    /// the GSO fallback, at most twice).
    fn send(&mut self, socket: &UdpSocket, stats: &mut Stats) {
        let mut from = 0;
        // Twice at most: once with GSO, once more without if the kernel refused it.
        for _ in 0..2 {
            let count = self.plan(from);
            match self.transmit(socket, count, stats) {
                Ok(()) => return,
                Err(first_unsent) => {
                    // GSO refused (EINVAL/EIO): off for good, resend what is left one by one.
                    self.gso = false;
                    from = first_unsent;
                }
            }
        }
    }

    /// Fills tx_hdr from payloads[from..]: runs of equal-size payloads as one GSO send.
    fn plan(&mut self, from: usize) -> usize {
        let base = self.bufs.as_mut_ptr();
        for (iov, &(offset, len)) in self.tx_iov.iter_mut().zip(&self.payloads).skip(from) {
            // SAFETY: offset + len lies within bufs (a parsed segment of a received slot).
            iov.iov_base = unsafe { base.add(offset) }.cast();
            iov.iov_len = len;
        }
        self.tx_first.clear();
        let total = self.payloads.len();
        let mut i = from;
        let mut count = 0;
        while i < total {
            let size = self.payloads[i].1;
            let mut j = i + 1;
            if self.gso && size > 0 {
                while j < total
                    && self.payloads[j].1 == size
                    && j - i < MAX_GSO_SEGMENTS
                    && (j - i + 1) * size <= MAX_GSO_BYTES
                {
                    j += 1;
                }
            }
            let h = &mut self.tx_hdr[count].msg_hdr;
            h.msg_name = std::ptr::from_mut(&mut self.peer).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = &mut self.tx_iov[i];
            h.msg_iovlen = j - i;
            h.msg_flags = 0;
            if j - i > 1 {
                let ctrl = &mut self.tx_ctrl[count];
                h.msg_control = ctrl.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE is a pure size computation.
                h.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
                // SAFETY: the control buffer (32 bytes, u64-aligned) holds CMSG_SPACE(2) = 24
                // bytes, so the first header and its 2-byte payload are inside it.
                unsafe {
                    let cmsg = libc::CMSG_FIRSTHDR(h);
                    (*cmsg).cmsg_level = libc::SOL_UDP;
                    (*cmsg).cmsg_type = UDP_SEGMENT;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size as u16);
                }
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
            self.tx_hdr[count].msg_len = 0;
            self.tx_first.push(i);
            count += 1;
            i = j;
        }
        count
    }

    /// sendmmsg over tx_hdr[..count]. Err(payload index): GSO was refused at that send.
    fn transmit(
        &mut self,
        socket: &UdpSocket,
        count: usize,
        stats: &mut Stats,
    ) -> Result<(), usize> {
        let mut done = 0;
        // Each pass sends at least one message or skips one: at most count + 1 passes.
        for _ in 0..=count {
            if done >= count {
                break;
            }
            // SAFETY: tx_hdr[done..count] are headers planned by `plan`, pointing at iovecs,
            // control buffers and the peer address owned by self, and at received payloads in
            // bufs; none is moved or freed during the call.
            let rc = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    self.tx_hdr.as_mut_ptr().add(done),
                    (count - done) as libc::c_uint,
                    0,
                )
            };
            stats.send_calls += 1;
            if rc > 0 {
                for h in &self.tx_hdr[done..done + rc as usize] {
                    stats.forwarded += h.msg_hdr.msg_iovlen as u64;
                }
                done += rc as usize;
                continue;
            }
            let err = std::io::Error::last_os_error();
            let gso_send = !self.tx_hdr[done].msg_hdr.msg_control.is_null();
            if gso_send && self.gso && matches!(err.raw_os_error(), Some(libc::EINVAL | libc::EIO))
            {
                return Err(self.tx_first[done]);
            }
            // Anything else (ENOBUFS, a full queue): that send is lost, go on with the rest.
            stats.send_errors += 1;
            done += 1;
        }
        Ok(())
    }
}

/// The payload length of a ChannelData message filling `seg` (with 0-3 padding bytes).
fn channel_data_payload(seg: &[u8]) -> Option<usize> {
    if seg.len() < 4 || seg[0] >> 6 != 0b01 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([seg[2], seg[3]]));
    let rest = seg.len() - 4;
    (len <= rest && rest - len <= 3).then_some(len)
}

/// The UDP_GRO segment size of a received message, if the kernel coalesced datagrams.
fn gro_segment(hdr: &libc::msghdr) -> Option<usize> {
    if hdr.msg_control.is_null() || hdr.msg_controllen < size_of::<libc::cmsghdr>() {
        return None;
    }
    // SAFETY: `hdr` was just filled by the kernel: msg_control points at our control buffer
    // of msg_controllen valid bytes, which the CMSG_* macros stay within.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        // At most as many headers as fit in the buffer.
        for _ in 0..CTRL_WORDS {
            if cmsg.is_null() {
                break;
            }
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                return usize::try_from(size).ok();
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::channel_data_payload;

    #[test]
    fn channel_data_check() {
        let mut m = vec![0x40, 0x00, 0x00, 0x03, 1, 2, 3];
        assert_eq!(channel_data_payload(&m), Some(3));
        m.push(0);
        assert_eq!(channel_data_payload(&m), Some(3));
        m.extend([0, 0, 0]);
        assert_eq!(channel_data_payload(&m), None, "over 3 padding bytes");
        assert_eq!(channel_data_payload(&[0x00, 0x01, 0, 0]), None, "STUN");
        assert_eq!(channel_data_payload(&[0x40, 0x00, 0, 9, 1]), None, "short");
    }
}
