//! STUN message encoder (RFC 8489 §5, §14).

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

use super::{
    message_type, Attribute, Class, Method, TransactionId, FINGERPRINT_XOR, HEADER_LEN,
    MAGIC_COOKIE,
};

/// Which integrity attribute to append, with its key.
#[derive(Clone, Copy, Debug)]
pub enum Integrity<'k> {
    /// MESSAGE-INTEGRITY (HMAC-SHA1, 20 bytes)
    Sha1(&'k [u8]),
    /// MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256, 32 bytes)
    Sha256(&'k [u8]),
}

/// Builds one STUN message into a `Vec<u8>`.
#[derive(Debug)]
pub struct MessageBuilder {
    buf: Vec<u8>,
    transaction_id: TransactionId,
    padding: u8,
}

impl MessageBuilder {
    /// Starts a message.
    pub fn new(class: Class, method: Method, transaction_id: TransactionId) -> Self {
        Self::with_buffer(Vec::with_capacity(128), class, method, transaction_id)
    }

    /// Starts a message in `buf` (cleared first), to reuse an allocation.
    pub fn with_buffer(
        mut buf: Vec<u8>,
        class: Class,
        method: Method,
        transaction_id: TransactionId,
    ) -> Self {
        buf.clear();
        buf.extend_from_slice(&message_type(class, method).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&transaction_id.0);
        Self {
            buf,
            transaction_id,
            padding: 0,
        }
    }

    /// The byte used to pad attribute values to 4 bytes (default 0; RFC 5389 senders may use
    /// anything, which the RFC 5769 vectors do).
    pub fn padding_byte(&mut self, byte: u8) -> &mut Self {
        self.padding = byte;
        self
    }

    fn set_length(&mut self, len: usize) {
        let len = u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes();
        if let Some(field) = self.buf.get_mut(2..4) {
            field.copy_from_slice(&len);
        }
    }

    /// Appends a typed attribute.
    pub fn add(&mut self, attr: &Attribute<'_>) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&attr.typ().to_be_bytes());
        self.buf.extend_from_slice(&[0, 0]);
        attr.encode_value(&mut self.buf, &self.transaction_id);
        let value_len = self.buf.len() - start - 4;
        let len = u16::try_from(value_len).unwrap_or(u16::MAX).to_be_bytes();
        if let Some(field) = self.buf.get_mut(start + 2..start + 4) {
            field.copy_from_slice(&len);
        }
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(self.padding);
        }
        let total = self.buf.len() - HEADER_LEN;
        self.set_length(total);
        self
    }

    /// Appends a raw attribute.
    pub fn add_raw(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        self.add(&Attribute::Unknown { typ, value })
    }

    /// Bytes written so far (for size checks).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Never true: the header is always there.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends MESSAGE-INTEGRITY with `key` if given, then FINGERPRINT if asked.
    pub fn finish(self, integrity_key: Option<&[u8]>, fingerprint: bool) -> Vec<u8> {
        self.finish_with(integrity_key.map(Integrity::Sha1), fingerprint)
    }

    /// Appends the chosen integrity attribute, then FINGERPRINT if asked.
    pub fn finish_with(mut self, integrity: Option<Integrity<'_>>, fingerprint: bool) -> Vec<u8> {
        match integrity {
            Some(Integrity::Sha1(key)) => {
                // The length field must already count the attribute (RFC 8489 §14.5).
                let total = self.buf.len() + 24 - HEADER_LEN;
                self.set_length(total);
                let mac = match <Hmac<Sha1> as Mac>::new_from_slice(key) {
                    Ok(mut mac) => {
                        mac.update(&self.buf);
                        let mut out = [0u8; 20];
                        out.copy_from_slice(&mac.finalize().into_bytes());
                        out
                    }
                    Err(_) => [0u8; 20],
                };
                self.add(&Attribute::MessageIntegrity(mac));
            }
            Some(Integrity::Sha256(key)) => {
                let total = self.buf.len() + 36 - HEADER_LEN;
                self.set_length(total);
                let mut out = [0u8; 32];
                if let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key) {
                    mac.update(&self.buf);
                    out.copy_from_slice(&mac.finalize().into_bytes());
                }
                self.add(&Attribute::MessageIntegritySha256(&out));
            }
            None => {}
        }
        if fingerprint {
            let total = self.buf.len() + 8 - HEADER_LEN;
            self.set_length(total);
            let crc = crc32fast::hash(&self.buf) ^ FINGERPRINT_XOR;
            self.add(&Attribute::Fingerprint(crc));
        }
        self.buf
    }
}
