//! ChannelData messages (RFC 8656 §12.4) and the first-byte demultiplexer (RFC 8656 §12,
//! RFC 7983).

/// Channel numbers a client may bind (RFC 8656 §12).
pub const CHANNEL_RANGE: std::ops::RangeInclusive<u16> = 0x4000..=0x4FFF;
/// The wider range of RFC 5766 §11, which older clients (coturn's among them) still pick from.
/// The server accepts it only when configured to; ChannelData in it always decodes, because
/// only a bound channel is ever forwarded.
pub const LEGACY_CHANNEL_RANGE: std::ops::RangeInclusive<u16> = 0x4000..=0x7FFF;
/// Size of the ChannelData header.
pub const CHANNEL_DATA_HEADER_LEN: usize = 4;

/// What a datagram on a TURN listener is, judged from its first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketKind {
    /// Top two bits 0b00: a STUN message.
    Stun,
    /// Top two bits 0b01: a ChannelData message.
    ChannelData,
    /// Anything else (or empty).
    Other,
}

/// Classifies a datagram by its first two bits.
pub fn classify(buf: &[u8]) -> PacketKind {
    match buf.first().map(|b| b >> 6) {
        Some(0b00) => PacketKind::Stun,
        Some(0b01) => PacketKind::ChannelData,
        _ => PacketKind::Other,
    }
}

/// A ChannelData message borrowing its datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelData<'a> {
    /// Channel number, 0x4000..=0x4FFF.
    pub channel: u16,
    /// Application data.
    pub data: &'a [u8],
}

/// Why a datagram is not a ChannelData message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChannelDataError {
    /// Shorter than the 4-byte header.
    #[error("shorter than the ChannelData header")]
    TooShort,
    /// Channel number outside 0x4000..=0x7FFF.
    #[error("channel number {0:#06x} outside 0x4000..=0x7FFF")]
    BadChannel(u16),
    /// The length field disagrees with the datagram beyond 0–3 bytes of padding.
    #[error("length field {field} does not match {available} bytes of data")]
    BadLength {
        /// the length field
        field: usize,
        /// bytes after the header
        available: usize,
    },
}

impl<'a> ChannelData<'a> {
    /// Parses a ChannelData datagram; over UDP up to 3 trailing padding bytes are tolerated
    /// (RFC 8656 §12.5), any other mismatch is rejected.
    pub fn decode(buf: &'a [u8]) -> Result<Self, ChannelDataError> {
        let (header, rest) = buf
            .split_first_chunk::<CHANNEL_DATA_HEADER_LEN>()
            .ok_or(ChannelDataError::TooShort)?;
        let channel = u16::from_be_bytes([header[0], header[1]]);
        let field = usize::from(u16::from_be_bytes([header[2], header[3]]));
        if !LEGACY_CHANNEL_RANGE.contains(&channel) {
            return Err(ChannelDataError::BadChannel(channel));
        }
        let bad = ChannelDataError::BadLength {
            field,
            available: rest.len(),
        };
        if rest.len() < field || rest.len() - field > 3 {
            return Err(bad);
        }
        let data = rest.get(..field).ok_or(bad)?;
        Ok(ChannelData { channel, data })
    }

    /// Appends the encoded message to `out`, optionally padded to a multiple of 4 bytes
    /// (required over TCP, optional over UDP). Data longer than 65535 bytes is truncated to
    /// fit the length field; callers never have such datagrams over UDP.
    pub fn encode_into(&self, out: &mut Vec<u8>, pad: bool) {
        let len = self.data.len().min(usize::from(u16::MAX));
        out.extend_from_slice(&self.channel.to_be_bytes());
        out.extend_from_slice(&(len as u16).to_be_bytes());
        out.extend_from_slice(self.data.get(..len).unwrap_or_default());
        if pad {
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        }
    }

    /// The 4-byte header that makes `len` bytes of data a ChannelData message on `channel`
    /// (RFC 8656 §12.4), for callers that write it in front of data they already hold.
    /// `len` is at most 65535 for any UDP datagram.
    pub fn header(channel: u16, len: u16) -> [u8; CHANNEL_DATA_HEADER_LEN] {
        let [c0, c1] = channel.to_be_bytes();
        let [l0, l1] = len.to_be_bytes();
        [c0, c1, l0, l1]
    }

    /// Encodes into a fresh `Vec`.
    pub fn encode(&self, pad: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(CHANNEL_DATA_HEADER_LEN + self.data.len() + 3);
        self.encode_into(&mut out, pad);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_padding() {
        let m = ChannelData {
            channel: 0x4abc,
            data: b"voice",
        };
        let plain = m.encode(false);
        assert_eq!(plain, [0x4a, 0xbc, 0, 5, b'v', b'o', b'i', b'c', b'e']);
        assert_eq!(ChannelData::decode(&plain), Ok(m));
        assert_eq!(ChannelData::header(0x4abc, 5), plain[..4]);
        let padded = m.encode(true);
        assert_eq!(padded.len(), 12);
        assert_eq!(ChannelData::decode(&padded), Ok(m));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            ChannelData::decode(&[0x40, 0]),
            Err(ChannelDataError::TooShort)
        );
        assert_eq!(
            ChannelData::decode(&[0x3f, 0xff, 0, 0]),
            Err(ChannelDataError::BadChannel(0x3fff))
        );
        assert_eq!(
            ChannelData::decode(&[0x80, 0x00, 0, 0]),
            Err(ChannelDataError::BadChannel(0x8000))
        );
        // Length past the datagram.
        assert!(matches!(
            ChannelData::decode(&[0x40, 0, 0, 5, 1, 2, 3]),
            Err(ChannelDataError::BadLength { .. })
        ));
        // Four trailing bytes are not padding.
        assert!(matches!(
            ChannelData::decode(&[0x40, 0, 0, 1, 1, 0, 0, 0, 0]),
            Err(ChannelDataError::BadLength { .. })
        ));
        assert_eq!(
            ChannelData::decode(&[0x40, 0, 0, 1, 1, 0, 0, 0]).map(|c| c.data),
            Ok(&[1u8][..])
        );
        assert_eq!(
            ChannelData::decode(&[0x4f, 0xff, 0, 0]).map(|c| c.data.len()),
            Ok(0)
        );
    }

    #[test]
    fn classifies_first_byte() {
        assert_eq!(classify(&[]), PacketKind::Other);
        assert_eq!(classify(&[0x00, 1]), PacketKind::Stun);
        assert_eq!(classify(&[0x40]), PacketKind::ChannelData);
        assert_eq!(classify(&[0x80]), PacketKind::Other);
        assert_eq!(classify(&[0xff]), PacketKind::Other);
    }

    proptest! {
        #[test]
        fn prop_round_trip(channel in 0x4000u16..=0x4fff, data in proptest::collection::vec(any::<u8>(), 0..600), pad in any::<bool>()) {
            let m = ChannelData { channel, data: &data };
            let bytes = m.encode(pad);
            prop_assert_eq!(ChannelData::decode(&bytes), Ok(m));
            prop_assert_eq!(classify(&bytes), PacketKind::ChannelData);
        }

        #[test]
        fn prop_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(m) = ChannelData::decode(&bytes) {
                prop_assert!(LEGACY_CHANNEL_RANGE.contains(&m.channel));
                prop_assert!(bytes.len() - 4 - m.data.len() <= 3);
            }
        }
    }
}
