//! STUN message codec (RFC 8489) with the TURN attributes of RFC 8656.
//!
//! Decoding borrows the datagram ([`Message<'a>`]); a message whose header is valid but whose
//! attributes are not still yields method, class and transaction id
//! ([`DecodeError::BadAttributes`]) so the server can answer 400. Encoding goes through
//! [`MessageBuilder`], which appends MESSAGE-INTEGRITY / MESSAGE-INTEGRITY-SHA256 and
//! FINGERPRINT last.

mod attributes;
mod builder;
mod error_code;
mod message;
#[cfg(test)]
mod tests;

pub use attributes::{attr_type, AddressFamily, Attribute, ErrorCode};
pub use builder::{Integrity, MessageBuilder};
pub use error_code::StunErrorCode;
pub use message::{AttributeError, DecodeError, IntegrityError, Message};

/// The fixed magic cookie of every RFC 5389/8489 message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header.
pub const HEADER_LEN: usize = 20;
/// XORed into the CRC-32 of the FINGERPRINT attribute (RFC 8489 §14.7).
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// The 96-bit transaction id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransactionId(pub [u8; 12]);

impl TransactionId {
    /// A random transaction id from an injected RNG.
    pub fn random<R: rand::Rng + ?Sized>(rng: &mut R) -> Self {
        let mut id = [0u8; 12];
        rng.fill_bytes(&mut id);
        Self(id)
    }
}

/// Message class (RFC 8489 §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// `0b00`
    Request,
    /// `0b01`
    Indication,
    /// `0b10`
    Success,
    /// `0b11`
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }

    fn from_bits(bits: u16) -> Self {
        match bits & 0b11 {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::Success,
            _ => Class::Error,
        }
    }
}

/// A 12-bit STUN method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Method(u16);

impl Method {
    /// Binding (RFC 8489).
    pub const BINDING: Method = Method(0x001);
    /// Allocate (RFC 8656 §7).
    pub const ALLOCATE: Method = Method(0x003);
    /// Refresh (RFC 8656 §8).
    pub const REFRESH: Method = Method(0x004);
    /// Send indication (RFC 8656 §11).
    pub const SEND: Method = Method(0x006);
    /// Data indication (RFC 8656 §11).
    pub const DATA: Method = Method(0x007);
    /// CreatePermission (RFC 8656 §10).
    pub const CREATE_PERMISSION: Method = Method(0x008);
    /// ChannelBind (RFC 8656 §12).
    pub const CHANNEL_BIND: Method = Method(0x009);

    /// A method from its 12-bit number; `None` above 0xFFF.
    pub const fn new(value: u16) -> Option<Self> {
        if value <= 0xFFF {
            Some(Method(value))
        } else {
            None
        }
    }

    /// The 12-bit method number.
    pub const fn value(self) -> u16 {
        self.0
    }

    /// A lower-case name for metrics labels and logs (`other` for methods the relay does not
    /// serve).
    pub const fn label(self) -> &'static str {
        match self.0 {
            0x001 => "binding",
            0x003 => "allocate",
            0x004 => "refresh",
            0x006 => "send",
            0x007 => "data",
            0x008 => "create_permission",
            0x009 => "channel_bind",
            _ => "other",
        }
    }
}

/// Interleaves method and class into the 14-bit message type (RFC 8489 §5, figure 3).
pub fn message_type(class: Class, method: Method) -> u16 {
    let m = method.0;
    let c = class.bits();
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 0b01) << 4) | ((c & 0b10) << 7)
}

/// Splits a message type (top two bits already known zero) into class and method.
pub fn split_message_type(t: u16) -> (Class, Method) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = ((t >> 4) & 0b01) | ((t >> 7) & 0b10);
    (Class::from_bits(class), Method(method))
}
