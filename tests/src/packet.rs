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

/// The STUN magic cookie (RFC 8489 §5).
pub const MAGIC_COOKIE: u32 = 0x2112_a442;
/// STUN header length (RFC 8489 §5).
pub const STUN_HEADER_LEN: usize = 20;
/// Message types (RFC 8656 §18): Send and Data indications.
pub const SEND_INDICATION: u16 = 0x0016;
pub const DATA_INDICATION: u16 = 0x0017;
/// Attribute types (RFC 8656 §18, RFC 8489 §18.3).
pub const XOR_PEER_ADDRESS: u16 = 0x0012;
pub const DATA: u16 = 0x0013;
pub const DONT_FRAGMENT: u16 = 0x001a;
pub const SOFTWARE: u16 = 0x8022;
pub const FINGERPRINT: u16 = 0x8028;

/// One STUN attribute (RFC 8489 §14): type, length of the value, the value, zero bytes up to
/// a multiple of four.
pub fn stun_attribute(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut attribute = Vec::with_capacity(4 + value.len().next_multiple_of(4));
    attribute.extend_from_slice(&kind.to_be_bytes());
    attribute.extend_from_slice(&(value.len() as u16).to_be_bytes());
    attribute.extend_from_slice(value);
    attribute.resize(4 + value.len().next_multiple_of(4), 0);
    attribute
}

/// A STUN message (RFC 8489 §5): `kind`, the length of `attributes` (already encoded and
/// padded), the magic cookie, `tid`, then the attributes.
pub fn stun_message(kind: u16, tid: [u8; 12], attributes: &[Vec<u8>]) -> Vec<u8> {
    let length: usize = attributes.iter().map(Vec::len).sum();
    let mut message = Vec::with_capacity(STUN_HEADER_LEN + length);
    message.extend_from_slice(&kind.to_be_bytes());
    message.extend_from_slice(&(length as u16).to_be_bytes());
    message.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    message.extend_from_slice(&tid);
    for attribute in attributes {
        message.extend_from_slice(attribute);
    }
    message
}

/// The value of an XOR-PEER-ADDRESS (RFC 8489 §14.2, the XOR-MAPPED-ADDRESS format): a zero
/// byte, the family (1 IPv4, 2 IPv6), the port XOR the cookie's top 16 bits, the address XOR
/// the cookie (IPv4) or the cookie followed by the transaction id (IPv6).
pub fn xor_address_value(tid: [u8; 12], address: SocketAddr) -> Vec<u8> {
    let mut mask = MAGIC_COOKIE.to_be_bytes().to_vec();
    mask.extend_from_slice(&tid);
    let (family, octets) = match address.ip() {
        IpAddr::V4(ip) => (1, ip.octets().to_vec()),
        IpAddr::V6(ip) => (2, ip.octets().to_vec()),
    };
    let mut value = vec![0, family];
    value.extend_from_slice(&(address.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    value.extend(octets.iter().zip(&mask).map(|(byte, mask)| byte ^ mask));
    value
}

/// An XOR-PEER-ADDRESS attribute for `peer`.
pub fn xor_peer_address(tid: [u8; 12], peer: SocketAddr) -> Vec<u8> {
    stun_attribute(XOR_PEER_ADDRESS, &xor_address_value(tid, peer))
}

/// A Send indication (RFC 8656 §11.1): XOR-PEER-ADDRESS, DATA, then `extra` attributes
/// (encoded with [`stun_attribute`]).
pub fn send_indication(tid: [u8; 12], peer: SocketAddr, data: &[u8], extra: &[Vec<u8>]) -> Vec<u8> {
    let mut attributes = vec![xor_peer_address(tid, peer), stun_attribute(DATA, data)];
    attributes.extend_from_slice(extra);
    stun_message(SEND_INDICATION, tid, &attributes)
}

/// A Data indication (RFC 8656 §11.4): XOR-PEER-ADDRESS and DATA, nothing else.
pub fn data_indication(tid: [u8; 12], peer: SocketAddr, data: &[u8]) -> Vec<u8> {
    stun_message(
        DATA_INDICATION,
        tid,
        &[xor_peer_address(tid, peer), stun_attribute(DATA, data)],
    )
}

/// CRC-32 (ISO-HDLC, the one FINGERPRINT uses), bit by bit.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for byte in data {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Appends a FINGERPRINT attribute (RFC 8489 §14.7) to `message`, updating its length field
/// first (the CRC covers the header with the final length).
pub fn add_fingerprint(message: &mut Vec<u8>) {
    let length = message.len() - STUN_HEADER_LEN + 8;
    message[2..4].copy_from_slice(&(length as u16).to_be_bytes());
    let value = crc32(message) ^ 0x5354_554e;
    message.extend_from_slice(&stun_attribute(FINGERPRINT, &value.to_be_bytes()));
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

    #[test]
    fn stun_builders_match_the_rfc_5769_vectors() {
        // RFC 5769 §2.1: XOR-MAPPED-ADDRESS of 192.0.2.1:32853.
        let tid = [
            0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
        ];
        assert_eq!(
            xor_address_value(tid, "192.0.2.1:32853".parse().unwrap()),
            [0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]
        );
        // RFC 5769 §2.2: [2001:db8:1234:5678:11:2233:4455:6677]:32853.
        assert_eq!(
            xor_address_value(
                tid,
                "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                    .parse()
                    .unwrap()
            ),
            [
                0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79, 0xbc, 0x25,
                0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9
            ]
        );
        let message = data_indication(tid, "192.0.2.1:32853".parse().unwrap(), b"odd");
        assert_eq!(&message[..4], [0x00, 0x17, 0x00, 20]);
        assert_eq!(&message[32..], b"\x00\x13\x00\x03odd\x00");
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }
}
