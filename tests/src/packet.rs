//! Ethernet / IPv4 or IPv6 / UDP frames with complete checksums, for packet fixtures.

use std::net::{IpAddr, SocketAddr};

/// The Internet checksum (RFC 1071) of `data`, starting from `initial`.
pub fn internet_checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = initial as u64;
    for chunk in data.chunks(2) {
        sum += u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]) as u64;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One UDP datagram in an Ethernet frame. Fields are public so fixtures can state exactly
/// what differs from the defaults of [`UdpFrame::new`].
#[derive(Clone, Debug)]
pub struct UdpFrame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
    /// TTL / hop limit.
    pub ttl: u8,
    /// IPv4 identification.
    pub ip_id: u16,
    /// IPv4 type of service / IPv6 traffic class.
    pub tos: u8,
    /// Send a zero UDP checksum ("none"; valid for IPv4 only).
    pub zero_checksum: bool,
}

impl UdpFrame {
    pub fn new(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: SocketAddr,
        dst: SocketAddr,
        payload: &[u8],
    ) -> Self {
        Self {
            src_mac,
            dst_mac,
            src,
            dst,
            payload: payload.to_vec(),
            ttl: 63,
            ip_id: 0x1234,
            tos: 0,
            zero_checksum: false,
        }
    }

    /// The frame's bytes with complete IPv4 header and UDP checksums.
    pub fn build(&self) -> Vec<u8> {
        let udp_len = 8 + self.payload.len();
        let mut udp = Vec::with_capacity(udp_len);
        udp.extend_from_slice(&self.src.port().to_be_bytes());
        udp.extend_from_slice(&self.dst.port().to_be_bytes());
        udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(&self.payload);

        let mut frame = Vec::new();
        frame.extend_from_slice(&self.dst_mac);
        frame.extend_from_slice(&self.src_mac);
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                frame.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut ip = Vec::with_capacity(20);
                ip.extend_from_slice(&[0x45, self.tos]);
                ip.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
                ip.extend_from_slice(&self.ip_id.to_be_bytes());
                ip.extend_from_slice(&[0x40, 0x00, self.ttl, 17, 0, 0]);
                ip.extend_from_slice(&src.octets());
                ip.extend_from_slice(&dst.octets());
                let check = internet_checksum(0, &ip);
                ip[10..12].copy_from_slice(&check.to_be_bytes());
                if !self.zero_checksum {
                    let mut pseudo = Vec::new();
                    pseudo.extend_from_slice(&src.octets());
                    pseudo.extend_from_slice(&dst.octets());
                    pseudo.extend_from_slice(&[0, 17]);
                    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
                    set_udp_checksum(&mut udp, &pseudo);
                }
                frame.extend_from_slice(&ip);
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                frame.extend_from_slice(&0x86ddu16.to_be_bytes());
                let tc = self.tos;
                frame.extend_from_slice(&[0x60 | (tc >> 4), tc << 4, 0, 0]);
                frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
                frame.extend_from_slice(&[17, self.ttl]);
                frame.extend_from_slice(&src.octets());
                frame.extend_from_slice(&dst.octets());
                if !self.zero_checksum {
                    let mut pseudo = Vec::new();
                    pseudo.extend_from_slice(&src.octets());
                    pseudo.extend_from_slice(&dst.octets());
                    pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
                    pseudo.extend_from_slice(&[0, 0, 0, 17]);
                    set_udp_checksum(&mut udp, &pseudo);
                }
            }
            _ => panic!("source and destination of different families"),
        }
        frame.extend_from_slice(&udp);
        frame
    }
}

fn set_udp_checksum(udp: &mut [u8], pseudo: &[u8]) {
    let mut all = pseudo.to_vec();
    all.extend_from_slice(udp);
    let check = match internet_checksum(0, &all) {
        0 => 0xffff,
        c => c,
    };
    udp[6..8].copy_from_slice(&check.to_be_bytes());
}

/// A ChannelData message (RFC 8656 §12.4): channel, length, data, then `padding` bytes.
pub fn channel_data(channel: u16, data: &[u8], padding: usize) -> Vec<u8> {
    let mut message = Vec::with_capacity(4 + data.len() + padding);
    message.extend_from_slice(&channel.to_be_bytes());
    message.extend_from_slice(&(data.len() as u16).to_be_bytes());
    message.extend_from_slice(data);
    message.extend(std::iter::repeat_n(0u8, padding));
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let frame = UdpFrame::new(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            "198.18.1.2:40000".parse().unwrap(),
            "198.18.1.1:3478".parse().unwrap(),
            b"hello",
        )
        .build();
        // A correct IPv4 header sums to 0xffff, i.e. its checksum over itself is zero.
        assert_eq!(internet_checksum(0, &frame[14..34]), 0);
        assert_eq!(channel_data(0x4001, b"abc", 1), b"\x40\x01\x00\x03abc\x00");
    }
}
