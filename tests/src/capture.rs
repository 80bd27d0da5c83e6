//! Reading whole frames off an interface (AF_PACKET), to check what actually went on the wire.

use std::{io, os::fd::AsRawFd, os::fd::FromRawFd, os::fd::OwnedFd, time::Duration};

/// An AF_PACKET socket bound to one interface, receiving every frame it sees (both
/// directions). Create it inside the interface's namespace (e.g. with `Netns::run_inside`);
/// the socket stays in that namespace afterwards.
pub struct Capture {
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

impl Capture {
    pub fn open(interface: &str) -> io::Result<Self> {
        let name = std::ffi::CString::new(interface)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name"))?;
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: all-zero is a valid sockaddr_ll; the fields we need are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a sockaddr_ll of the length passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of the length passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Self { fd })
    }

    /// Frames received until `quiet` passes without one (at most `max` frames).
    pub fn frames(&self, quiet: Duration, max: usize) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut idle = Duration::ZERO;
        let mut buf = vec![0u8; 65_536];
        while frames.len() < max && idle < quiet {
            // SAFETY: `buf` is writable for its whole length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                idle += Duration::from_millis(200);
                continue;
            }
            idle = Duration::ZERO;
            frames.push(buf[..n as usize].to_vec());
        }
        frames
    }
}

/// IP header fields of one UDP frame, as the relay's two paths must agree on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpFields {
    /// TTL / hop limit.
    pub ttl: u8,
    /// TOS / traffic class (DSCP and ECN).
    pub tos: u8,
    /// IPv4 DF bit (always false for IPv6).
    pub dont_fragment: bool,
    /// IPv6 flow label (0 for IPv4).
    pub flow_label: u32,
    /// UDP destination port.
    pub dst_port: u16,
}

/// The IP header fields of an Ethernet frame carrying UDP over IPv4 or IPv6 (no options or
/// extension headers), or `None` for anything else.
pub fn ip_fields(frame: &[u8]) -> Option<IpFields> {
    let ether_type = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    match ether_type {
        0x0800 => {
            let ip = frame.get(14..34)?;
            (ip[0] == 0x45 && ip[9] == 17).then_some(())?;
            let udp = frame.get(34..42)?;
            Some(IpFields {
                ttl: ip[8],
                tos: ip[1],
                dont_fragment: ip[6] & 0x40 != 0,
                flow_label: 0,
                dst_port: u16::from_be_bytes([udp[2], udp[3]]),
            })
        }
        0x86dd => {
            let ip = frame.get(14..54)?;
            (ip[6] == 17).then_some(())?;
            let udp = frame.get(54..62)?;
            let first = u32::from_be_bytes([ip[0], ip[1], ip[2], ip[3]]);
            Some(IpFields {
                ttl: ip[7],
                tos: ((first >> 20) & 0xff) as u8,
                dont_fragment: false,
                flow_label: first & 0xfffff,
                dst_port: u16::from_be_bytes([udp[2], udp[3]]),
            })
        }
        _ => None,
    }
}
