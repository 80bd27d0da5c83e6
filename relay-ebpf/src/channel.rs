//! The ChannelData header (RFC 8656 §12.4) as the fast path checks it.

use relay_common::{Reason, CHANNEL_DATA_HEADER_LEN, CHANNEL_MAX, CHANNEL_MIN};

/// A ChannelData message that fills a UDP payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelData {
    /// Channel number as a network-order field, as it is keyed in the map.
    pub channel: u16,
    /// Application data length (the header's length field).
    pub data_len: usize,
    /// Bytes after the data up to the end of the UDP payload (0..=3).
    pub padding: usize,
}

/// What the first four bytes of a UDP payload say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Classified {
    /// Not ChannelData: STUN (first two bits 0b00), or first two bits 0b10 / 0b11.
    NotChannelData,
    /// A ChannelData header whose length does not fit the UDP payload.
    Bad(Reason),
    ChannelData(ChannelData),
}

/// Checks `header` (the first four payload bytes) against a UDP payload of `udp_payload_len`.
///
/// Over UDP the message may be followed by up to three padding bytes (RFC 8656 §12.5: padding
/// is optional on UDP, mandatory on TCP); anything longer or shorter goes to the socket path.
#[inline(always)]
pub fn classify(header: [u8; 4], udp_payload_len: usize) -> Classified {
    let channel = u16::from_be_bytes([header[0], header[1]]);
    // The first two bits 0b01 mark ChannelData (0x4000..=0x7fff); whether the number is bound
    // is the map's business.
    if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&channel) {
        return Classified::NotChannelData;
    }
    let data_len = u16::from_be_bytes([header[2], header[3]]) as usize;
    let message_len = CHANNEL_DATA_HEADER_LEN + data_len;
    if udp_payload_len < message_len || udp_payload_len > message_len + 3 {
        return Classified::Bad(Reason::PassBadChannelLength);
    }
    Classified::ChannelData(ChannelData {
        channel: u16::from_ne_bytes([header[0], header[1]]),
        data_len,
        padding: udp_payload_len - message_len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(channel: u16, len: u16) -> [u8; 4] {
        let c = channel.to_be_bytes();
        let l = len.to_be_bytes();
        [c[0], c[1], l[0], l[1]]
    }

    #[test]
    fn accepts_exact_and_padded_messages() {
        for padding in 0..=3 {
            assert_eq!(
                classify(header(0x4000, 5), 9 + padding),
                Classified::ChannelData(ChannelData {
                    channel: relay_common::port_field(0x4000),
                    data_len: 5,
                    padding,
                })
            );
        }
        assert!(matches!(
            classify(header(0x4fff, 0), 4),
            Classified::ChannelData(ChannelData { data_len: 0, .. })
        ));
    }

    #[test]
    fn rejects_lengths_that_do_not_fit() {
        let bad = Classified::Bad(Reason::PassBadChannelLength);
        assert_eq!(classify(header(0x4001, 5), 8), bad, "truncated");
        assert_eq!(
            classify(header(0x4001, 5), 13),
            bad,
            "four bytes of padding"
        );
        assert_eq!(classify(header(0x4001, 0xffff), 100), bad);
    }

    #[test]
    fn other_first_bytes_are_not_channel_data() {
        // STUN Binding request, bits 0b10 / 0b11.
        for first in [0x0001u16, 0x3fff, 0x8000, 0xffff] {
            assert_eq!(
                classify(header(first, 0), 4),
                Classified::NotChannelData,
                "{first:#06x}"
            );
        }
    }
}
