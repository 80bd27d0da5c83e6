//! Bounds-checked access to the Ethernet, IP and UDP headers of one frame.
//!
//! Every accessor checks `start + offset + size <= end` right before handing out a pointer,
//! which is the shape the verifier needs to accept the access.

use relay_common::{ip_field, ipv4_field, ChannelKey, ClientKey, PeerKey, PermissionKey, Reason};

pub const ETH_HDR_LEN: usize = 14;
pub const IPV4_HDR_LEN: usize = 20;
pub const IPV6_HDR_LEN: usize = 40;
pub const UDP_HDR_LEN: usize = 8;

pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_UDP: u8 = 17;
/// IPv4 flags/fragment-offset bits that mark any fragment: MF plus the 13-bit offset.
const IPV4_FRAGMENT_MASK: u16 = 0x3fff;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub version_class_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<EthHdr>() == ETH_HDR_LEN);
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == IPV4_HDR_LEN);
const _: () = assert!(core::mem::size_of::<Ipv6Hdr>() == IPV6_HDR_LEN);
const _: () = assert!(core::mem::size_of::<UdpHdr>() == UDP_HDR_LEN);

/// The IP header of a parsed UDP datagram. The pointers are valid until the frame is resized.
#[derive(Clone, Copy)]
pub enum IpHeader {
    V4(*mut Ipv4Hdr),
    V6(*mut Ipv6Hdr),
}

/// A UDP datagram located inside a frame.
///
/// `repr(C)` with plain words first: subprograms take it by reference, so the entry point
/// stores it on its stack, and the verifier accepts the packet pointer in it only as a whole
/// 8-byte spill. A `Result<UdpDatagram, Reason>` keeps its error in the first word; were the
/// pointer there, LLVM would store it as two 32-bit halves, which the verifier refuses.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpDatagram {
    /// Offset of the UDP payload from the frame start.
    pub payload_offset: usize,
    /// UDP payload length as the UDP header states it.
    pub payload_len: usize,
    pub ip: IpHeader,
    /// The UDP header, copied (the rewrite overwrites it while still needing the old values).
    pub udp: UdpHdr,
}

impl UdpDatagram {
    /// The [`ChannelKey`] of this datagram if it carries ChannelData on `channel`.
    #[inline(always)]
    pub fn channel_key(&self, channel: u16) -> ChannelKey {
        let (client_ip, listener_ip) = self.addresses();
        ChannelKey {
            client_ip,
            listener_ip,
            client_port: u16::from_ne_bytes(self.udp.src_port),
            listener_port: u16::from_ne_bytes(self.udp.dst_port),
            channel,
            family: self.family(),
            reserved: 0,
        }
    }

    /// The [`PeerKey`] of this datagram if it comes from a peer.
    #[inline(always)]
    pub fn peer_key(&self) -> PeerKey {
        let (peer_ip, relayed_ip) = self.addresses();
        peer_key(
            peer_ip,
            relayed_ip,
            u16::from_ne_bytes(self.udp.src_port),
            u16::from_ne_bytes(self.udp.dst_port),
            self.family(),
        )
    }

    /// The [`ClientKey`] of this datagram if it comes from a client.
    #[inline(always)]
    pub fn client_key(&self) -> ClientKey {
        let (client_ip, listener_ip) = self.addresses();
        let mut key = ClientKey {
            client_ip,
            listener_ip,
            client_port: u16::from_ne_bytes(self.udp.src_port),
            listener_port: u16::from_ne_bytes(self.udp.dst_port),
            family: 0,
            reserved: [0; 3],
        };
        // As in `peer_key`: family and reserved bytes in one aligned word store.
        const _: () = assert!(
            core::mem::offset_of!(ClientKey, family) % 4 == 0
                && core::mem::size_of::<ClientKey>()
                    == core::mem::offset_of!(ClientKey, family) + 4
        );
        let tail = core::ptr::addr_of_mut!(key.family).cast::<u32>();
        // SAFETY: the word lies inside `key` and is 4-byte aligned (asserted above); any bit
        // pattern is valid for the `u8` fields it covers.
        unsafe { tail.write_volatile(u32::from_ne_bytes([self.family(), 0, 0, 0])) };
        key
    }

    /// Source and destination address as map fields (IPv4: first word, the rest zero).
    #[inline(always)]
    pub fn addresses(&self) -> ([u32; 4], [u32; 4]) {
        // SAFETY: the parser checked the headers lie inside the frame, and the frame has not been
        // resized since (callers only ask before rewriting).
        unsafe {
            match self.ip {
                IpHeader::V4(ip) => (ipv4_field((*ip).src), ipv4_field((*ip).dst)),
                IpHeader::V6(ip) => (ip_field((*ip).src), ip_field((*ip).dst)),
            }
        }
    }

    /// `relay_common::FAMILY_IPV4` or `FAMILY_IPV6`.
    #[inline(always)]
    pub fn family(&self) -> u8 {
        match self.ip {
            IpHeader::V4(_) => relay_common::FAMILY_IPV4,
            IpHeader::V6(_) => relay_common::FAMILY_IPV6,
        }
    }
}

/// A [`PeerKey`] with its reserved bytes zeroed, built without a `memset` call.
#[inline(always)]
pub fn peer_key(
    peer_ip: [u32; 4],
    relayed_ip: [u32; 4],
    peer_port: u16,
    relayed_port: u16,
    family: u8,
) -> PeerKey {
    let mut key = PeerKey {
        peer_ip,
        relayed_ip,
        peer_port,
        relayed_port,
        family: 0,
        reserved: [0; 3],
    };
    // `family` and the three zero bytes after it form one aligned word; one store writes
    // them all. Left to itself LLVM zeroes `reserved` with a `memset` call, which the BPF
    // target implements as a byte loop in a subprogram.
    const _: () = assert!(
        core::mem::offset_of!(PeerKey, reserved) == core::mem::offset_of!(PeerKey, family) + 1
            && core::mem::offset_of!(PeerKey, family) % 4 == 0
            && core::mem::size_of::<PeerKey>() == core::mem::offset_of!(PeerKey, family) + 4
    );
    let tail = core::ptr::addr_of_mut!(key.family).cast::<u32>();
    // SAFETY: the word lies inside `key` and is 4-byte aligned (asserted above; `PeerKey` is
    // `repr(C)` with `u32` fields, so aligned to 4); any bit pattern is valid for the `u8`
    // fields it covers. Volatile keeps it from being merged back into a `memset`.
    unsafe { tail.write_volatile(u32::from_ne_bytes([family, 0, 0, 0])) };
    key
}

/// A [`PermissionKey`] with its reserved byte zeroed, built without a `memset` call.
#[inline(always)]
pub fn permission_key(
    relayed_ip: [u32; 4],
    peer_ip: [u32; 4],
    relayed_port: u16,
    family: u8,
) -> PermissionKey {
    let mut key = PermissionKey {
        relayed_ip,
        peer_ip,
        relayed_port,
        family: 0,
        reserved: 0,
    };
    const _: () = assert!(
        core::mem::offset_of!(PermissionKey, family) % 2 == 0
            && core::mem::offset_of!(PermissionKey, reserved)
                == core::mem::offset_of!(PermissionKey, family) + 1
            && core::mem::size_of::<PermissionKey>()
                == core::mem::offset_of!(PermissionKey, family) + 2
    );
    let tail = core::ptr::addr_of_mut!(key.family).cast::<u16>();
    // SAFETY: the two bytes lie inside `key`, 2-byte aligned (asserted above).
    unsafe { tail.write_volatile(u16::from_ne_bytes([family, 0])) };
    key
}

/// A frame between `start` and `end` (the XDP `data` / `data_end` pointers).
pub struct Frame {
    start: usize,
    end: usize,
}

impl Frame {
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// Pointer to a `T` at `offset`, or `None` when it would reach past the frame end.
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Option<*mut T> {
        let at = self.start + offset;
        if at + core::mem::size_of::<T>() > self.end {
            return None;
        }
        Some(at as *mut T)
    }

    /// Frame length in bytes.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Parses down to the UDP header; the error names why the frame is not plain UDP.
    #[inline(always)]
    pub fn udp(&self) -> Result<UdpDatagram, Reason> {
        let eth: *mut EthHdr = self.ptr_at(0).ok_or(Reason::PassTruncatedEthernet)?;
        // SAFETY: `ptr_at` checked that a whole `EthHdr` lies inside the frame.
        let ether_type = u16::from_be_bytes(unsafe { (*eth).ether_type });
        let (ip, ip_payload_len, l4_offset) = match ether_type {
            ETH_P_IPV4 => self.ipv4()?,
            ETH_P_IPV6 => self.ipv6()?,
            _ => return Err(Reason::PassNotIp),
        };
        let udp: *mut UdpHdr = self.ptr_at(l4_offset).ok_or(Reason::PassMalformedUdp)?;
        // SAFETY: `ptr_at` checked that a whole `UdpHdr` lies inside the frame.
        let udp_len = u16::from_be_bytes(unsafe { (*udp).len }) as usize;
        // RFC 768: the UDP length covers header and data; it must fit the IP payload exactly
        // (a shorter UDP length would leave trailing bytes we would silently drop on rewrite).
        if udp_len < UDP_HDR_LEN || udp_len != ip_payload_len {
            return Err(Reason::PassMalformedUdp);
        }
        let payload_offset = l4_offset + UDP_HDR_LEN;
        let payload_len = udp_len - UDP_HDR_LEN;
        if payload_offset + payload_len > self.len() {
            return Err(Reason::PassMalformedUdp);
        }
        Ok(UdpDatagram {
            ip,
            // SAFETY: `ptr_at` checked that a whole `UdpHdr` lies inside the frame.
            udp: unsafe { *udp },
            payload_offset,
            payload_len,
        })
    }

    /// Returns the IPv4 header, its payload length and the L4 offset.
    #[inline(always)]
    fn ipv4(&self) -> Result<(IpHeader, usize, usize), Reason> {
        let ip: *mut Ipv4Hdr = self.ptr_at(ETH_HDR_LEN).ok_or(Reason::PassMalformedIp)?;
        // SAFETY: `ptr_at` checked that a whole `Ipv4Hdr` lies inside the frame.
        let hdr = unsafe { &*ip };
        if hdr.version_ihl >> 4 != 4 {
            return Err(Reason::PassMalformedIp);
        }
        let ihl = (hdr.version_ihl & 0x0f) as usize * 4;
        if ihl < IPV4_HDR_LEN {
            return Err(Reason::PassMalformedIp);
        }
        if ihl != IPV4_HDR_LEN {
            return Err(Reason::PassIpOptions);
        }
        if u16::from_be_bytes(hdr.frag_off) & IPV4_FRAGMENT_MASK != 0 {
            return Err(Reason::PassFragment);
        }
        let total_len = u16::from_be_bytes(hdr.total_len) as usize;
        if total_len < IPV4_HDR_LEN || ETH_HDR_LEN + total_len > self.len() {
            return Err(Reason::PassMalformedIp);
        }
        if hdr.protocol != IPPROTO_UDP {
            return Err(Reason::PassNotUdp);
        }
        Ok((
            IpHeader::V4(ip),
            total_len - IPV4_HDR_LEN,
            ETH_HDR_LEN + IPV4_HDR_LEN,
        ))
    }

    /// Returns the IPv6 header, its payload length and the L4 offset.
    ///
    /// Extension headers (including fragments) are not walked: only UDP directly after the
    /// fixed header is fast-path material.
    #[inline(always)]
    fn ipv6(&self) -> Result<(IpHeader, usize, usize), Reason> {
        const NEXT_HEADER_FRAGMENT: u8 = 44;
        let ip: *mut Ipv6Hdr = self.ptr_at(ETH_HDR_LEN).ok_or(Reason::PassMalformedIp)?;
        // SAFETY: `ptr_at` checked that a whole `Ipv6Hdr` lies inside the frame.
        let hdr = unsafe { &*ip };
        if hdr.version_class_flow[0] >> 4 != 6 {
            return Err(Reason::PassMalformedIp);
        }
        let payload_len = u16::from_be_bytes(hdr.payload_len) as usize;
        if ETH_HDR_LEN + IPV6_HDR_LEN + payload_len > self.len() {
            return Err(Reason::PassMalformedIp);
        }
        match hdr.next_header {
            IPPROTO_UDP => Ok((IpHeader::V6(ip), payload_len, ETH_HDR_LEN + IPV6_HDR_LEN)),
            NEXT_HEADER_FRAGMENT => Err(Reason::PassFragment),
            _ => Err(Reason::PassNotUdp),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(bytes: &[u8]) -> Frame {
        let start = bytes.as_ptr() as usize;
        Frame::new(start, start + bytes.len())
    }

    fn ipv4_udp(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
        let total = (IPV4_HDR_LEN + UDP_HDR_LEN + payload.len()) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_UDP, 0, 0]);
        f.extend_from_slice(&[198, 18, 1, 2, 198, 18, 1, 1]);
        f.extend_from_slice(&[0x30, 0x39, 0x0d, 0x96]);
        f.extend_from_slice(&((UDP_HDR_LEN + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn parses_ipv4_udp() {
        let bytes = ipv4_udp(b"hello");
        let udp = frame_of(&bytes)
            .udp()
            .unwrap_or_else(|r| panic!("valid frame: {r:?}"));
        assert_eq!(udp.payload_offset, 42);
        assert_eq!(udp.payload_len, 5);
    }

    #[test]
    fn peer_key_carries_family_and_zero_padding() {
        let bytes = ipv4_udp(b"hello");
        let udp = frame_of(&bytes)
            .udp()
            .unwrap_or_else(|r| panic!("valid frame: {r:?}"));
        let key = udp.peer_key();
        assert_eq!(key.family, relay_common::FAMILY_IPV4);
        assert_eq!(key.reserved, [0; 3]);
        assert_eq!(key.peer_ip, ipv4_field([198, 18, 1, 2]));
        assert_eq!(key.relayed_ip, ipv4_field([198, 18, 1, 1]));
        assert_eq!(key.peer_port, u16::from_ne_bytes([0x30, 0x39]));
        assert_eq!(key.relayed_port, u16::from_ne_bytes([0x0d, 0x96]));
    }

    #[test]
    fn classifies_what_it_passes() {
        assert_eq!(
            frame_of(&[0u8; 10]).udp().err(),
            Some(Reason::PassTruncatedEthernet)
        );

        let mut arp = ipv4_udp(b"x");
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(frame_of(&arp).udp().err(), Some(Reason::PassNotIp));

        let mut options = ipv4_udp(b"x");
        options[14] = 0x46;
        assert_eq!(frame_of(&options).udp().err(), Some(Reason::PassIpOptions));

        let mut fragment = ipv4_udp(b"x");
        fragment[20] = 0x20; // MF
        assert_eq!(frame_of(&fragment).udp().err(), Some(Reason::PassFragment));

        let mut tcp = ipv4_udp(b"x");
        tcp[23] = 6;
        assert_eq!(frame_of(&tcp).udp().err(), Some(Reason::PassNotUdp));

        let mut bad_udp_len = ipv4_udp(b"xyz");
        bad_udp_len[39] = 9;
        assert_eq!(
            frame_of(&bad_udp_len).udp().err(),
            Some(Reason::PassMalformedUdp)
        );

        let truncated = ipv4_udp(b"payload");
        assert_eq!(
            frame_of(&truncated[..40]).udp().err(),
            Some(Reason::PassMalformedIp)
        );
    }
}
