//! Borrowing STUN message decoder and integrity/fingerprint verification (RFC 8489 §5, §14).

use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::attributes::{attr_type, ValueError};
use super::{
    split_message_type, Attribute, Class, Method, TransactionId, FINGERPRINT_XOR, HEADER_LEN,
    MAGIC_COOKIE,
};

/// Why the attribute section of a message with a valid header is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AttributeError {
    /// An attribute header or value runs past the end of the message.
    #[error("attribute runs past the end of the message")]
    Truncated,
    /// A known attribute carries a malformed value.
    #[error(transparent)]
    Value(#[from] ValueError),
    /// Something follows FINGERPRINT, which must be last.
    #[error("attribute after FINGERPRINT")]
    AfterFingerprint,
}

/// Decoding failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not a STUN message at all: too short, top bits set, wrong cookie, length not a multiple
    /// of 4 or not matching the datagram. Nothing to answer.
    #[error("not a STUN message")]
    NotStun,
    /// A valid header with broken attributes: enough to answer 400.
    #[error("bad attributes in {class:?} {method:?}: {error}")]
    BadAttributes {
        /// method of the message
        method: Method,
        /// class of the message
        class: Class,
        /// its transaction id
        transaction_id: TransactionId,
        /// what was wrong
        error: AttributeError,
    },
}

/// Integrity verification failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    /// The message carries no integrity attribute of the asked kind.
    #[error("no integrity attribute")]
    Missing,
    /// The HMAC does not match.
    #[error("integrity mismatch")]
    Mismatch,
}

/// A decoded STUN message borrowing its datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    class: Class,
    method: Method,
    transaction_id: TransactionId,
    raw: &'a [u8],
    attributes: Vec<Attribute<'a>>,
    unknown_required: Vec<u16>,
    /// Offset of the MESSAGE-INTEGRITY attribute header.
    integrity_at: Option<usize>,
    /// Offset of the MESSAGE-INTEGRITY-SHA256 attribute header.
    integrity_sha256_at: Option<usize>,
    /// Offset of the FINGERPRINT attribute header.
    fingerprint_at: Option<usize>,
}

fn padded(len: usize) -> usize {
    (len + 3) & !3
}

impl<'a> Message<'a> {
    /// Decodes one STUN message occupying the whole of `buf`.
    pub fn decode(buf: &'a [u8]) -> Result<Self, DecodeError> {
        let header: &[u8; HEADER_LEN] = buf
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(DecodeError::NotStun)?;
        let msg_type = u16::from_be_bytes([header[0], header[1]]);
        let length = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let cookie = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
        if msg_type & 0xC000 != 0
            || cookie != MAGIC_COOKIE
            || length % 4 != 0
            || buf.len() != HEADER_LEN + length
        {
            return Err(DecodeError::NotStun);
        }
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&header[8..20]);
        let transaction_id = TransactionId(tid);
        let (class, method) = split_message_type(msg_type);
        let mut message = Message {
            class,
            method,
            transaction_id,
            raw: buf,
            attributes: Vec::new(),
            unknown_required: Vec::new(),
            integrity_at: None,
            integrity_sha256_at: None,
            fingerprint_at: None,
        };
        message
            .parse_attributes()
            .map_err(|error| DecodeError::BadAttributes {
                method,
                class,
                transaction_id,
                error,
            })?;
        Ok(message)
    }

    fn parse_attributes(&mut self) -> Result<(), AttributeError> {
        let buf = self.raw;
        let mut at = HEADER_LEN;
        while at < buf.len() {
            let head = buf.get(at..at + 4).ok_or(AttributeError::Truncated)?;
            let typ = u16::from_be_bytes([head[0], head[1]]);
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            let value = buf
                .get(at + 4..at + 4 + len)
                .ok_or(AttributeError::Truncated)?;
            let next = at + 4 + padded(len);
            if next > buf.len() {
                return Err(AttributeError::Truncated);
            }
            if self.fingerprint_at.is_some() {
                return Err(AttributeError::AfterFingerprint);
            }
            // RFC 8489 §14.5/§14.6: after MESSAGE-INTEGRITY only MESSAGE-INTEGRITY-SHA256 and
            // FINGERPRINT count; after MESSAGE-INTEGRITY-SHA256 only FINGERPRINT.
            let ignored = match typ {
                attr_type::FINGERPRINT => false,
                attr_type::MESSAGE_INTEGRITY_SHA256 => self.integrity_sha256_at.is_some(),
                _ => self.integrity_at.is_some() || self.integrity_sha256_at.is_some(),
            };
            if !ignored {
                let attr = Attribute::decode(typ, value, &self.transaction_id)?;
                match &attr {
                    Attribute::MessageIntegrity(_) => self.integrity_at = Some(at),
                    Attribute::MessageIntegritySha256(_) => self.integrity_sha256_at = Some(at),
                    Attribute::Fingerprint(_) => self.fingerprint_at = Some(at),
                    Attribute::Unknown { typ, .. }
                        if attr_type::is_comprehension_required(*typ)
                            && !self.unknown_required.contains(typ) =>
                    {
                        self.unknown_required.push(*typ)
                    }
                    _ => {}
                }
                self.attributes.push(attr);
            }
            at = next;
        }
        Ok(())
    }

    /// Message class.
    pub fn class(&self) -> Class {
        self.class
    }

    /// Message method.
    pub fn method(&self) -> Method {
        self.method
    }

    /// Transaction id.
    pub fn transaction_id(&self) -> TransactionId {
        self.transaction_id
    }

    /// The raw bytes of the whole message.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// The attributes that count, in order (those after the integrity attributes that RFC 8489
    /// says to ignore are left out).
    pub fn attributes(&self) -> &[Attribute<'a>] {
        &self.attributes
    }

    /// Comprehension-required attribute types this codec does not understand (answer 420).
    pub fn unknown_comprehension_required(&self) -> &[u16] {
        &self.unknown_required
    }

    fn find<T>(&self, f: impl Fn(&Attribute<'a>) -> Option<T>) -> Option<T> {
        self.attributes.iter().find_map(f)
    }

    /// USERNAME
    pub fn username(&self) -> Option<&'a str> {
        self.find(|a| match a {
            Attribute::Username(s) => Some(*s),
            _ => None,
        })
    }

    /// REALM
    pub fn realm(&self) -> Option<&'a str> {
        self.find(|a| match a {
            Attribute::Realm(s) => Some(*s),
            _ => None,
        })
    }

    /// NONCE
    pub fn nonce(&self) -> Option<&'a str> {
        self.find(|a| match a {
            Attribute::Nonce(s) => Some(*s),
            _ => None,
        })
    }

    /// SOFTWARE
    pub fn software(&self) -> Option<&'a str> {
        self.find(|a| match a {
            Attribute::Software(s) => Some(*s),
            _ => None,
        })
    }

    /// LIFETIME in seconds
    pub fn lifetime(&self) -> Option<u32> {
        self.find(|a| match a {
            Attribute::Lifetime(v) => Some(*v),
            _ => None,
        })
    }

    /// CHANNEL-NUMBER
    pub fn channel_number(&self) -> Option<u16> {
        self.find(|a| match a {
            Attribute::ChannelNumber(v) => Some(*v),
            _ => None,
        })
    }

    /// DATA
    pub fn data(&self) -> Option<&'a [u8]> {
        self.find(|a| match a {
            Attribute::Data(d) => Some(*d),
            _ => None,
        })
    }

    /// XOR-MAPPED-ADDRESS
    pub fn xor_mapped_address(&self) -> Option<SocketAddr> {
        self.find(|a| match a {
            Attribute::XorMappedAddress(v) => Some(*v),
            _ => None,
        })
    }

    /// XOR-RELAYED-ADDRESS
    pub fn xor_relayed_address(&self) -> Option<SocketAddr> {
        self.find(|a| match a {
            Attribute::XorRelayedAddress(v) => Some(*v),
            _ => None,
        })
    }

    /// All XOR-PEER-ADDRESS attributes.
    pub fn xor_peer_addresses(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.attributes.iter().filter_map(|a| match a {
            Attribute::XorPeerAddress(v) => Some(*v),
            _ => None,
        })
    }

    /// ALTERNATE-SERVER (RFC 8489 §14.15)
    pub fn alternate_server(&self) -> Option<SocketAddr> {
        self.find(|a| match a {
            Attribute::AlternateServer(v) => Some(*v),
            _ => None,
        })
    }

    /// ALTERNATE-DOMAIN (RFC 8489 §14.16)
    pub fn alternate_domain(&self) -> Option<&'a str> {
        self.find(|a| match a {
            Attribute::AlternateDomain(s) => Some(*s),
            _ => None,
        })
    }

    /// ERROR-CODE reason phrase
    pub fn error_reason(&self) -> Option<&'a str> {
        self.find(|a| match a {
            Attribute::ErrorCode(e) => Some(e.reason),
            _ => None,
        })
    }

    /// ERROR-CODE number
    pub fn error_code(&self) -> Option<u16> {
        self.find(|a| match a {
            Attribute::ErrorCode(e) => Some(e.code),
            _ => None,
        })
    }

    /// Whether an attribute of this type is present.
    pub fn has(&self, typ: u16) -> bool {
        self.attributes.iter().any(|a| a.typ() == typ)
    }

    /// Whether MESSAGE-INTEGRITY is present.
    pub fn has_integrity(&self) -> bool {
        self.integrity_at.is_some()
    }

    /// Whether MESSAGE-INTEGRITY-SHA256 is present.
    pub fn has_integrity_sha256(&self) -> bool {
        self.integrity_sha256_at.is_some()
    }

    /// Whether FINGERPRINT is present.
    pub fn has_fingerprint(&self) -> bool {
        self.fingerprint_at.is_some()
    }

    /// The bytes an integrity attribute at `at` with a `mac_len`-byte value covers: the header
    /// with its length adjusted to end at that attribute, then everything before it
    /// (RFC 8489 §14.5).
    fn covered(&self, at: usize, mac_len: usize) -> Option<([u8; 4], &'a [u8], &'a [u8])> {
        let adjusted = u16::try_from(at + 4 + mac_len - HEADER_LEN).ok()?;
        let head = self.raw.get(..2)?;
        let rest = self.raw.get(4..at)?;
        let len = adjusted.to_be_bytes();
        Some((
            [head[0], head[1], len[0], len[1]],
            rest,
            self.raw.get(at + 4..)?,
        ))
    }

    /// Checks MESSAGE-INTEGRITY (HMAC-SHA1) with `key`, in constant time.
    pub fn verify_integrity(&self, key: &[u8]) -> Result<(), IntegrityError> {
        let at = self.integrity_at.ok_or(IntegrityError::Missing)?;
        let (head, rest, tail) = self.covered(at, 20).ok_or(IntegrityError::Missing)?;
        let got = tail.get(..20).ok_or(IntegrityError::Missing)?;
        let mut mac =
            <Hmac<Sha1> as Mac>::new_from_slice(key).map_err(|_| IntegrityError::Mismatch)?;
        mac.update(&head);
        mac.update(rest);
        let want = mac.finalize().into_bytes();
        if bool::from(want.as_slice().ct_eq(got)) {
            Ok(())
        } else {
            Err(IntegrityError::Mismatch)
        }
    }

    /// Checks MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256, possibly truncated) with `key`, in
    /// constant time.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> Result<(), IntegrityError> {
        let at = self.integrity_sha256_at.ok_or(IntegrityError::Missing)?;
        let len = self
            .attributes
            .iter()
            .find_map(|a| match a {
                Attribute::MessageIntegritySha256(m) => Some(m.len()),
                _ => None,
            })
            .ok_or(IntegrityError::Missing)?;
        let (head, rest, tail) = self.covered(at, len).ok_or(IntegrityError::Missing)?;
        let got = tail.get(..len).ok_or(IntegrityError::Missing)?;
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|_| IntegrityError::Mismatch)?;
        mac.update(&head);
        mac.update(rest);
        let want = mac.finalize().into_bytes();
        let want = want.get(..len).ok_or(IntegrityError::Mismatch)?;
        if bool::from(want.ct_eq(got)) {
            Ok(())
        } else {
            Err(IntegrityError::Mismatch)
        }
    }

    /// `None` without FINGERPRINT, else whether it matches (RFC 8489 §14.7).
    pub fn verify_fingerprint(&self) -> Option<bool> {
        let at = self.fingerprint_at?;
        let got = self.attributes.iter().find_map(|a| match a {
            Attribute::Fingerprint(v) => Some(*v),
            _ => None,
        })?;
        let covered = self.raw.get(..at)?;
        Some(crc32fast::hash(covered) ^ FINGERPRINT_XOR == got)
    }
}
