//! Sockets: client-facing listeners and per-allocation relay sockets.
//!
//! Everything the daemon needs from the OS about UDP lives here, so the daemon loop never
//! touches a raw socket call: [`recv`] reads batches into a worker's arena, [`send`] flushes its
//! transmit queue, [`epoll`] reports which of its sockets are readable, [`batch`] holds the
//! socket options and control messages they share.

pub mod batch;
pub mod epoll;
pub mod framing;
pub mod recv;
pub mod send;
#[cfg(test)]
mod tests;

use std::{
    io,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
};

use socket2::{Domain, Protocol, Socket, Type};

/// Receive/send buffer asked for on a listener: bursts of small datagrams from every client of
/// a worker must not be dropped while the worker is busy (the kernel caps it at
/// net.core.rmem_max).
const LISTENER_BUFFER_BYTES: usize = 4 << 20;
/// Receive/send buffer of a relay socket: one allocation's peers (a few flows), so a fraction of
/// a listener's. Thousands of relay sockets each allowed 4 MiB could hold gigabytes queued where
/// an operator raised rmem_max.
const RELAY_BUFFER_BYTES: usize = 256 << 10;

/// Largest UDP payload the relay reads (a full 64 KiB datagram).
pub const MAX_DATAGRAM: usize = 65_535;

static GRO: AtomicBool = AtomicBool::new(true);

/// Whether sockets bound from now on ask for UDP GRO. The kernel only coalesces a flow's
/// datagrams for GRO-enabled sockets, and a TC program sees such an aggregate as one skb it
/// cannot forward datagram by datagram: the TC fast path wants GRO off.
pub fn set_gro(on: bool) {
    GRO.store(on, Ordering::Relaxed);
}

/// Makes the IP header fields of what this socket sends those the kernel fast path writes, so
/// both paths look the same on the wire whatever the host's sysctls say (RFC 8656 §14
/// "alternate behaviour"): TTL / hop limit [`relay_common::FORWARD_TTL`], DSCP/ECN 0 (the
/// socket default), IPv4 DF on every datagram that fits the path MTU (IP_PMTUDISC_WANT: larger
/// ones are fragmented, as the kernel path passes them to this path), IPv6 flow label 0.
/// Best effort: a kernel that refuses one of them keeps its default.
fn set_header_fields(socket: &Socket, ipv6: bool) {
    let ttl = u32::from(relay_common::FORWARD_TTL);
    if ipv6 {
        let _ = socket.set_unicast_hops_v6(ttl);
        // IPV6_AUTOFLOWLABEL (linux/in6.h): off, so the flow label is 0 as on the kernel path.
        const IPV6_AUTOFLOWLABEL: libc::c_int = 70;
        let _ = batch::set_int_option(socket, libc::IPPROTO_IPV6, IPV6_AUTOFLOWLABEL, 0);
    } else {
        let _ = socket.set_ttl(ttl);
        let _ = batch::set_int_option(
            socket,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_WANT,
        );
    }
}

/// Binds a non-blocking UDP listener socket on exactly `addr` (port 0 picks a free port).
///
/// IPv6 sockets are v6-only so an IPv4 listener on the same port can coexist. With
/// `reuse_port`, several sockets (one per worker) share the address and the kernel spreads
/// clients over them by their address hash, so one client always reaches the same worker.
/// A wildcard `addr` (0.0.0.0, ::) gets pktinfo on receive (see [`batch::enable_pktinfo`]),
/// so each datagram says which local address it was sent to; failing that is an error, since
/// the relay could not answer from the address the client contacted.
pub fn bind_udp_std(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::UdpSocket> {
    bind(
        addr,
        reuse_port,
        GRO.load(Ordering::Relaxed),
        LISTENER_BUFFER_BYTES,
    )
}

/// Binds the relay socket of an allocation on exactly `addr`, without UDP GRO: every peer
/// datagram then lands in a receive slot of its own, behind the headroom its ChannelData header
/// is written into (the datagrams of a GRO aggregate follow each other with no room between).
pub fn bind_relay(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    bind(addr, false, false, RELAY_BUFFER_BYTES)
}

fn bind(
    addr: SocketAddr,
    reuse_port: bool,
    gro: bool,
    buffer_bytes: usize,
) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Best effort: a smaller buffer still works, it only drops earlier under bursts.
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    socket.set_nonblocking(true)?;
    set_header_fields(&socket, addr.is_ipv6());
    if addr.ip().is_unspecified() {
        batch::enable_pktinfo(&socket, addr.is_ipv6())?;
    }
    socket.bind(&addr.into())?;
    // Bursts from one flow arrive as one buffer; the receiver splits them.
    if gro {
        batch::enable_gro(&socket);
    }
    Ok(socket.into())
}

/// Connections waiting to be accepted per TCP/TLS listener socket.
const TCP_BACKLOG: i32 = 1024;

/// Binds a non-blocking TCP listener for TURN over TCP or TLS on exactly `addr`; with
/// `reuse_port` one per worker, and the kernel spreads connections over them. IPv6 sockets
/// are v6-only, as for UDP. SO_REUSEADDR lets a restarted relay bind while old connections
/// of its predecessor are in TIME_WAIT.
pub fn bind_tcp_listener(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(TCP_BACKLOG)?;
    Ok(socket.into())
}
