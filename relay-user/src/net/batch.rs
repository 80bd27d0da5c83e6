//! The Linux UDP plumbing shared by receiving ([`super::recv`]) and sending ([`super::send`]):
//! socket options (UDP_GRO, UDP_SEGMENT probing, pktinfo), control messages and socket address
//! conversion.
//!
//! GSO support is probed once; an EIO from a GSO send turns it off for good with one log line
//! (drivers without checksum offload refuse it).
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

use tracing::warn;

/// `UDP_SEGMENT` from linux/udp.h.
pub(super) const UDP_SEGMENT: libc::c_int = 103;
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
pub(super) const CONTROL_WORD: usize = size_of::<u64>();

/// Words of control buffer a receive needs: the UDP_GRO segment size and the destination
/// address (an IPv6 pktinfo is the larger of the two families), both on one message.
pub(super) const RECV_CONTROL_WORDS: usize = (cmsg_space(size_of::<libc::c_int>())
    + cmsg_space(size_of::<libc::in6_pktinfo>()))
.div_ceil(CONTROL_WORD);

/// Words of control buffer one sent message needs: the UDP_SEGMENT size and the source address.
pub(super) const SEND_CONTROL_WORDS: usize = (cmsg_space(size_of::<u16>())
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

pub(super) fn disable_gso(error: &io::Error) {
    if GSO_ENABLED.swap(false, Ordering::Relaxed) {
        warn!(%error, "UDP GSO send failed; sending without segmentation from now on");
    }
}

/// Whether sends may use UDP GSO now.
pub(super) fn gso_enabled() -> bool {
    GSO_ENABLED.load(Ordering::Relaxed)
}

/// The destination of a received datagram, from its pktinfo control message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Destination {
    /// No pktinfo (the socket did not ask for it).
    Unknown,
    /// A unicast address of this host.
    Unicast(IpAddr),
    /// A broadcast or multicast address.
    NotUnicast,
}

/// What the control messages of one received message say.
pub(super) struct Control {
    /// UDP_GRO segment size, if the kernel coalesced datagrams.
    pub(super) segment: Option<usize>,
    pub(super) to: Destination,
}

/// Reads the UDP_GRO segment size and the pktinfo destination of a received message.
pub(super) fn parse_control(hdr: &libc::msghdr) -> Control {
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
pub(super) fn ipv4_destination(info: &libc::in_pktinfo) -> Destination {
    let to = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
    let spec = Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr));
    if to.is_multicast() || to.is_broadcast() || (!spec.is_unspecified() && spec != to) {
        Destination::NotUnicast
    } else {
        Destination::Unicast(IpAddr::V4(to))
    }
}

pub(super) fn to_socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
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

pub(super) fn to_storage(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
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

/// Appends a control message carrying `value` at byte `offset` of `buf`; returns the offset
/// after it. Control buffers are sized for everything a message carries (a unit test checks
/// the sizes), so one that does not fit is a bug: it is left out and logged, never written
/// past the buffer.
pub(super) fn put_cmsg<T: Copy>(
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
pub(super) fn put_source(buf: &mut [u64], offset: usize, src: IpAddr) -> usize {
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

/// GSO on or off for the tests that compare both (they take turns through their own lock).
#[cfg(test)]
pub(super) fn set_gso_for_test(on: bool) {
    GSO_ENABLED.store(on, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
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

    #[test]
    fn socket_addresses_round_trip_through_sockaddr_storage() {
        for s in ["198.18.0.1:3478", "[2001:db8::1]:49152"] {
            let addr: SocketAddr = s.parse().expect("addr");
            let (storage, _) = to_storage(addr);
            assert_eq!(to_socket_addr(&storage), Some(addr));
        }
    }
}
