//! Typed STUN/TURN attributes: value decoding and encoding (RFC 8489 §14, RFC 8656 §18).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{TransactionId, MAGIC_COOKIE};

/// Attribute type numbers.
pub mod attr_type {
    /// RFC 8489 §14.1
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    /// RFC 8489 §14.3
    pub const USERNAME: u16 = 0x0006;
    /// RFC 8489 §14.5
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// RFC 8489 §14.8
    pub const ERROR_CODE: u16 = 0x0009;
    /// RFC 8489 §14.13
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    /// RFC 8656 §18.1
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    /// RFC 8656 §18.2
    pub const LIFETIME: u16 = 0x000D;
    /// RFC 8656 §18.3
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    /// RFC 8656 §18.4
    pub const DATA: u16 = 0x0013;
    /// RFC 8489 §14.9
    pub const REALM: u16 = 0x0014;
    /// RFC 8489 §14.10
    pub const NONCE: u16 = 0x0015;
    /// RFC 8656 §18.5
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    /// RFC 8656 §18.6
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    /// RFC 8656 §18.7
    pub const EVEN_PORT: u16 = 0x0018;
    /// RFC 8656 §18.8
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    /// RFC 8656 §18.9
    pub const DONT_FRAGMENT: u16 = 0x001A;
    /// RFC 8489 §14.6
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    /// RFC 8489 §14.2
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// RFC 8656 §18.10
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    /// RFC 8656 §18.11
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    /// RFC 8656 §18.12
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    /// RFC 8489 §14.16
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    /// RFC 8656 §18.13
    pub const ICMP: u16 = 0x8004;
    /// RFC 8489 §14.15
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    /// RFC 8489 §14.14
    pub const SOFTWARE: u16 = 0x8022;
    /// RFC 8489 §14.7
    pub const FINGERPRINT: u16 = 0x8028;

    /// Types below 0x8000 must be understood (RFC 8489 §14).
    pub const fn is_comprehension_required(t: u16) -> bool {
        t < 0x8000
    }
}

/// Address family byte of REQUESTED-ADDRESS-FAMILY, ADDITIONAL-ADDRESS-FAMILY and
/// ADDRESS-ERROR-CODE (RFC 8656 §18.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressFamily {
    /// 0x01
    V4,
    /// 0x02
    V6,
    /// Anything else, kept so the server can answer 440.
    Other(u8),
}

impl AddressFamily {
    /// The wire byte.
    pub fn to_byte(self) -> u8 {
        match self {
            AddressFamily::V4 => 0x01,
            AddressFamily::V6 => 0x02,
            AddressFamily::Other(b) => b,
        }
    }

    /// From the wire byte.
    pub fn from_byte(b: u8) -> Self {
        match b {
            0x01 => AddressFamily::V4,
            0x02 => AddressFamily::V6,
            other => AddressFamily::Other(other),
        }
    }

    /// The family of an IP address.
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => AddressFamily::V4,
            IpAddr::V6(_) => AddressFamily::V6,
        }
    }
}

/// ERROR-CODE value (RFC 8489 §14.8): code 300..=699 and a reason phrase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorCode<'a> {
    /// class * 100 + number
    pub code: u16,
    /// UTF-8 reason phrase
    pub reason: &'a str,
}

/// A decoded attribute, borrowing the message where it carries bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute<'a> {
    /// MAPPED-ADDRESS
    MappedAddress(SocketAddr),
    /// XOR-MAPPED-ADDRESS
    XorMappedAddress(SocketAddr),
    /// XOR-PEER-ADDRESS
    XorPeerAddress(SocketAddr),
    /// XOR-RELAYED-ADDRESS
    XorRelayedAddress(SocketAddr),
    /// USERNAME
    Username(&'a str),
    /// REALM
    Realm(&'a str),
    /// NONCE
    Nonce(&'a str),
    /// SOFTWARE
    Software(&'a str),
    /// ERROR-CODE
    ErrorCode(ErrorCode<'a>),
    /// UNKNOWN-ATTRIBUTES
    UnknownAttributes(Vec<u16>),
    /// MESSAGE-INTEGRITY (HMAC-SHA1)
    MessageIntegrity([u8; 20]),
    /// MESSAGE-INTEGRITY-SHA256 (16 to 32 bytes, a multiple of 4)
    MessageIntegritySha256(&'a [u8]),
    /// FINGERPRINT
    Fingerprint(u32),
    /// CHANNEL-NUMBER
    ChannelNumber(u16),
    /// LIFETIME in seconds
    Lifetime(u32),
    /// DATA
    Data(&'a [u8]),
    /// REQUESTED-TRANSPORT protocol number (17 = UDP)
    RequestedTransport(u8),
    /// DONT-FRAGMENT
    DontFragment,
    /// EVEN-PORT with its R (reserve next port) bit
    EvenPort(bool),
    /// RESERVATION-TOKEN
    ReservationToken([u8; 8]),
    /// REQUESTED-ADDRESS-FAMILY
    RequestedAddressFamily(AddressFamily),
    /// ADDITIONAL-ADDRESS-FAMILY
    AdditionalAddressFamily(AddressFamily),
    /// ADDRESS-ERROR-CODE
    AddressErrorCode {
        /// family the error is about
        family: AddressFamily,
        /// the error
        error: ErrorCode<'a>,
    },
    /// ALTERNATE-SERVER (RFC 8489 §14.15): where a 300 sends the client; a plain (not XOR'd)
    /// address like MAPPED-ADDRESS
    AlternateServer(SocketAddr),
    /// ALTERNATE-DOMAIN (RFC 8489 §14.16): the name to verify the alternate's TLS certificate
    /// against
    AlternateDomain(&'a str),
    /// ICMP
    Icmp {
        /// ICMP type
        icmp_type: u8,
        /// ICMP code
        code: u8,
        /// error data
        data: u32,
    },
    /// Any other attribute, kept raw.
    Unknown {
        /// attribute type
        typ: u16,
        /// raw value
        value: &'a [u8],
    },
}

/// Why an attribute value did not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("attribute {typ:#06x}: {what}")]
pub struct ValueError {
    /// attribute type
    pub typ: u16,
    /// what was wrong
    pub what: &'static str,
}

const MAX_USERNAME: usize = 512;
const MAX_TEXT: usize = 763;

fn be16(v: &[u8], at: usize) -> Option<u16> {
    let b = v.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

fn be32(v: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = v.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

fn decode_address(v: &[u8], xor: Option<&TransactionId>) -> Option<SocketAddr> {
    let family = *v.get(1)?;
    let mut port = be16(v, 2)?;
    let cookie = MAGIC_COOKIE.to_be_bytes();
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match (family, v.len()) {
        (0x01, 8) => {
            let mut ip: [u8; 4] = v.get(4..8)?.try_into().ok()?;
            if xor.is_some() {
                for (b, k) in ip.iter_mut().zip(cookie.iter()) {
                    *b ^= k;
                }
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (0x02, 20) => {
            let mut ip: [u8; 16] = v.get(4..20)?.try_into().ok()?;
            if let Some(tid) = xor {
                let key = cookie.iter().chain(tid.0.iter());
                for (b, k) in ip.iter_mut().zip(key) {
                    *b ^= k;
                }
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => None,
    }
}

fn encode_address(out: &mut Vec<u8>, addr: SocketAddr, xor: Option<&TransactionId>) {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut port = addr.port();
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.extend_from_slice(&[0, 0x01]);
            out.extend_from_slice(&port.to_be_bytes());
            let mut o = ip.octets();
            if xor.is_some() {
                for (b, k) in o.iter_mut().zip(cookie.iter()) {
                    *b ^= k;
                }
            }
            out.extend_from_slice(&o);
        }
        IpAddr::V6(ip) => {
            out.extend_from_slice(&[0, 0x02]);
            out.extend_from_slice(&port.to_be_bytes());
            let mut o = ip.octets();
            if let Some(tid) = xor {
                for (b, k) in o.iter_mut().zip(cookie.iter().chain(tid.0.iter())) {
                    *b ^= k;
                }
            }
            out.extend_from_slice(&o);
        }
    }
}

fn text(v: &[u8], max: usize) -> Option<&str> {
    if v.len() > max {
        return None;
    }
    std::str::from_utf8(v).ok()
}

fn decode_error_code(v: &[u8]) -> Option<ErrorCode<'_>> {
    let class = u16::from(*v.get(2)? & 0x07);
    let number = u16::from(*v.get(3)?);
    if !(3..=6).contains(&class) || number > 99 {
        return None;
    }
    let reason = text(v.get(4..)?, MAX_TEXT)?;
    Some(ErrorCode {
        code: class * 100 + number,
        reason,
    })
}

fn encode_error_code(out: &mut Vec<u8>, prefix: u8, e: &ErrorCode<'_>) {
    let class = (e.code / 100) as u8 & 0x07;
    let number = (e.code % 100) as u8;
    out.extend_from_slice(&[prefix, 0, class, number]);
    out.extend_from_slice(e.reason.as_bytes());
}

fn family_word(v: &[u8]) -> Option<AddressFamily> {
    if v.len() != 4 {
        return None;
    }
    Some(AddressFamily::from_byte(*v.first()?))
}

impl<'a> Attribute<'a> {
    /// The attribute type number.
    pub fn typ(&self) -> u16 {
        use attr_type::*;
        match self {
            Attribute::MappedAddress(_) => MAPPED_ADDRESS,
            Attribute::XorMappedAddress(_) => XOR_MAPPED_ADDRESS,
            Attribute::XorPeerAddress(_) => XOR_PEER_ADDRESS,
            Attribute::XorRelayedAddress(_) => XOR_RELAYED_ADDRESS,
            Attribute::Username(_) => USERNAME,
            Attribute::Realm(_) => REALM,
            Attribute::Nonce(_) => NONCE,
            Attribute::Software(_) => SOFTWARE,
            Attribute::ErrorCode(_) => ERROR_CODE,
            Attribute::UnknownAttributes(_) => UNKNOWN_ATTRIBUTES,
            Attribute::MessageIntegrity(_) => MESSAGE_INTEGRITY,
            Attribute::MessageIntegritySha256(_) => MESSAGE_INTEGRITY_SHA256,
            Attribute::Fingerprint(_) => FINGERPRINT,
            Attribute::ChannelNumber(_) => CHANNEL_NUMBER,
            Attribute::Lifetime(_) => LIFETIME,
            Attribute::Data(_) => DATA,
            Attribute::RequestedTransport(_) => REQUESTED_TRANSPORT,
            Attribute::DontFragment => DONT_FRAGMENT,
            Attribute::EvenPort(_) => EVEN_PORT,
            Attribute::ReservationToken(_) => RESERVATION_TOKEN,
            Attribute::RequestedAddressFamily(_) => REQUESTED_ADDRESS_FAMILY,
            Attribute::AdditionalAddressFamily(_) => ADDITIONAL_ADDRESS_FAMILY,
            Attribute::AddressErrorCode { .. } => ADDRESS_ERROR_CODE,
            Attribute::AlternateServer(_) => ALTERNATE_SERVER,
            Attribute::AlternateDomain(_) => ALTERNATE_DOMAIN,
            Attribute::Icmp { .. } => ICMP,
            Attribute::Unknown { typ, .. } => *typ,
        }
    }

    /// Decodes one attribute value. Types this codec does not know come back as
    /// [`Attribute::Unknown`]; known types with a malformed value are an error.
    pub fn decode(typ: u16, v: &'a [u8], tid: &TransactionId) -> Result<Self, ValueError> {
        use attr_type::*;
        let bad = |what| ValueError { typ, what };
        let attr = match typ {
            MAPPED_ADDRESS => {
                Attribute::MappedAddress(decode_address(v, None).ok_or(bad("bad address"))?)
            }
            XOR_MAPPED_ADDRESS => {
                Attribute::XorMappedAddress(decode_address(v, Some(tid)).ok_or(bad("bad address"))?)
            }
            XOR_PEER_ADDRESS => {
                Attribute::XorPeerAddress(decode_address(v, Some(tid)).ok_or(bad("bad address"))?)
            }
            XOR_RELAYED_ADDRESS => Attribute::XorRelayedAddress(
                decode_address(v, Some(tid)).ok_or(bad("bad address"))?,
            ),
            USERNAME => Attribute::Username(text(v, MAX_USERNAME).ok_or(bad("bad text"))?),
            REALM => Attribute::Realm(text(v, MAX_TEXT).ok_or(bad("bad text"))?),
            NONCE => Attribute::Nonce(text(v, MAX_TEXT).ok_or(bad("bad text"))?),
            SOFTWARE => Attribute::Software(text(v, MAX_TEXT).ok_or(bad("bad text"))?),
            ERROR_CODE => Attribute::ErrorCode(decode_error_code(v).ok_or(bad("bad error code"))?),
            UNKNOWN_ATTRIBUTES => {
                if !v.len().is_multiple_of(2) {
                    return Err(bad("odd length"));
                }
                Attribute::UnknownAttributes(
                    v.chunks_exact(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect(),
                )
            }
            MESSAGE_INTEGRITY => {
                Attribute::MessageIntegrity(v.try_into().map_err(|_| bad("length not 20"))?)
            }
            MESSAGE_INTEGRITY_SHA256 => {
                if !(16..=32).contains(&v.len()) || !v.len().is_multiple_of(4) {
                    return Err(bad("bad length"));
                }
                Attribute::MessageIntegritySha256(v)
            }
            FINGERPRINT => {
                if v.len() != 4 {
                    return Err(bad("length not 4"));
                }
                Attribute::Fingerprint(be32(v, 0).ok_or(bad("length not 4"))?)
            }
            CHANNEL_NUMBER => {
                if v.len() != 4 {
                    return Err(bad("length not 4"));
                }
                Attribute::ChannelNumber(be16(v, 0).ok_or(bad("length not 4"))?)
            }
            LIFETIME => {
                if v.len() != 4 {
                    return Err(bad("length not 4"));
                }
                Attribute::Lifetime(be32(v, 0).ok_or(bad("length not 4"))?)
            }
            DATA => Attribute::Data(v),
            REQUESTED_TRANSPORT => {
                if v.len() != 4 {
                    return Err(bad("length not 4"));
                }
                Attribute::RequestedTransport(*v.first().ok_or(bad("length not 4"))?)
            }
            DONT_FRAGMENT => {
                if !v.is_empty() {
                    return Err(bad("length not 0"));
                }
                Attribute::DontFragment
            }
            EVEN_PORT => match v {
                [b] => Attribute::EvenPort(b & 0x80 != 0),
                _ => return Err(bad("length not 1")),
            },
            RESERVATION_TOKEN => {
                Attribute::ReservationToken(v.try_into().map_err(|_| bad("length not 8"))?)
            }
            REQUESTED_ADDRESS_FAMILY => {
                Attribute::RequestedAddressFamily(family_word(v).ok_or(bad("length not 4"))?)
            }
            ADDITIONAL_ADDRESS_FAMILY => {
                Attribute::AdditionalAddressFamily(family_word(v).ok_or(bad("length not 4"))?)
            }
            ADDRESS_ERROR_CODE => Attribute::AddressErrorCode {
                family: AddressFamily::from_byte(*v.first().ok_or(bad("too short"))?),
                error: decode_error_code(v).ok_or(bad("bad error code"))?,
            },
            ALTERNATE_SERVER => {
                Attribute::AlternateServer(decode_address(v, None).ok_or(bad("bad address"))?)
            }
            ALTERNATE_DOMAIN => {
                Attribute::AlternateDomain(text(v, MAX_TEXT).ok_or(bad("bad text"))?)
            }
            ICMP => {
                if v.len() != 8 {
                    return Err(bad("length not 8"));
                }
                Attribute::Icmp {
                    icmp_type: *v.get(2).ok_or(bad("length not 8"))?,
                    code: *v.get(3).ok_or(bad("length not 8"))?,
                    data: be32(v, 4).ok_or(bad("length not 8"))?,
                }
            }
            _ => Attribute::Unknown { typ, value: v },
        };
        Ok(attr)
    }

    /// Appends the attribute value (no header, no padding).
    pub fn encode_value(&self, out: &mut Vec<u8>, tid: &TransactionId) {
        match self {
            Attribute::MappedAddress(a) | Attribute::AlternateServer(a) => {
                encode_address(out, *a, None)
            }
            Attribute::XorMappedAddress(a)
            | Attribute::XorPeerAddress(a)
            | Attribute::XorRelayedAddress(a) => encode_address(out, *a, Some(tid)),
            Attribute::Username(s)
            | Attribute::Realm(s)
            | Attribute::Nonce(s)
            | Attribute::Software(s)
            | Attribute::AlternateDomain(s) => out.extend_from_slice(s.as_bytes()),
            Attribute::ErrorCode(e) => encode_error_code(out, 0, e),
            Attribute::UnknownAttributes(list) => {
                for t in list {
                    out.extend_from_slice(&t.to_be_bytes());
                }
            }
            Attribute::MessageIntegrity(mac) => out.extend_from_slice(mac),
            Attribute::MessageIntegritySha256(mac) => out.extend_from_slice(mac),
            Attribute::Fingerprint(v) | Attribute::Lifetime(v) => {
                out.extend_from_slice(&v.to_be_bytes())
            }
            Attribute::ChannelNumber(n) => {
                out.extend_from_slice(&n.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
            Attribute::Data(d) => out.extend_from_slice(d),
            Attribute::RequestedTransport(p) => out.extend_from_slice(&[*p, 0, 0, 0]),
            Attribute::DontFragment => {}
            Attribute::EvenPort(r) => out.push(if *r { 0x80 } else { 0 }),
            Attribute::ReservationToken(t) => out.extend_from_slice(t),
            Attribute::RequestedAddressFamily(f) | Attribute::AdditionalAddressFamily(f) => {
                out.extend_from_slice(&[f.to_byte(), 0, 0, 0])
            }
            Attribute::AddressErrorCode { family, error } => {
                encode_error_code(out, family.to_byte(), error)
            }
            Attribute::Icmp {
                icmp_type,
                code,
                data,
            } => {
                out.extend_from_slice(&[0, 0, *icmp_type, *code]);
                out.extend_from_slice(&data.to_be_bytes());
            }
            Attribute::Unknown { value, .. } => out.extend_from_slice(value),
        }
    }
}
