//! Message boundaries on a TCP or TLS byte stream (RFC 8656 §5, RFC 8489 §6.2).
//!
//! A stream carries STUN messages and ChannelData messages back to back. The first two bits
//! tell them apart (RFC 7983): `00` is STUN, whose header gives the length of the attributes
//! after its 20 bytes; `01` is ChannelData (channel numbers 0x4000-0x7FFF), whose 4-byte
//! header gives the length of its data, padded to a multiple of 4 on a stream (RFC 8656
//! §12.5). Anything else cannot be resynchronised, so the connection is closed.

/// The largest message a client may send on a stream, header included. STUN requests are a
/// few hundred bytes; a Send indication or ChannelData message above this would make a UDP
/// datagram beyond any path MTU anyway. Bounds what one connection can make the relay buffer.
pub const MAX_STREAM_MESSAGE: usize = 16 * 1024;

/// STUN header: type, length, magic cookie, transaction id.
const STUN_HEADER: usize = 20;
/// ChannelData header: channel number, length.
const CHANNEL_HEADER: usize = 4;

/// Why a stream cannot be read any further.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FramingError {
    /// The first bits are neither STUN (00) nor ChannelData (01).
    NotTurn,
    /// A STUN length that is not a multiple of 4 (RFC 8489 §5): not STUN after all.
    BadStunLength,
    /// A message longer than [`MAX_STREAM_MESSAGE`].
    TooLarge,
}

impl FramingError {
    /// A short name for logs and metrics labels.
    pub fn label(self) -> &'static str {
        match self {
            FramingError::NotTurn => "not_turn",
            FramingError::BadStunLength => "bad_stun_length",
            FramingError::TooLarge => "too_large",
        }
    }
}

/// One complete message at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The message itself (header included, padding excluded).
    pub message: usize,
    /// What it takes on the stream (with ChannelData padding).
    pub consumed: usize,
}

/// The message at the start of `buf`: `Ok(None)` while it is incomplete (read more), an error
/// when the stream is not TURN or the message is too large. Decided from the header alone, so
/// a client announcing an oversized message is refused before it is buffered.
pub fn next_frame(buf: &[u8]) -> Result<Option<Frame>, FramingError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let kind = first >> 6;
    if kind > 1 {
        return Err(FramingError::NotTurn);
    }
    let Some(length) = buf.get(2..4) else {
        return Ok(None);
    };
    let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
    let (message, consumed) = if kind == 0 {
        if length % 4 != 0 {
            return Err(FramingError::BadStunLength);
        }
        (STUN_HEADER + length, STUN_HEADER + length)
    } else {
        (
            CHANNEL_HEADER + length,
            CHANNEL_HEADER + length.next_multiple_of(4),
        )
    };
    if consumed > MAX_STREAM_MESSAGE {
        return Err(FramingError::TooLarge);
    }
    Ok((buf.len() >= consumed).then_some(Frame { message, consumed }))
}

/// Padding that brings a ChannelData message of `len` bytes to a multiple of 4 on a stream.
pub fn stream_padding(len: usize) -> usize {
    len.next_multiple_of(4) - len
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stun(attributes: usize) -> Vec<u8> {
        let mut m = vec![0x00, 0x01];
        m.extend((attributes as u16).to_be_bytes());
        m.extend(0x2112_A442u32.to_be_bytes());
        m.extend([7u8; 12]);
        m.extend(std::iter::repeat_n(0u8, attributes));
        m
    }

    #[test]
    fn stun_and_channel_data_back_to_back() {
        let mut stream = stun(8);
        stream.extend([0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0]);
        stream.extend(stun(0));
        let first = next_frame(&stream).unwrap().unwrap();
        assert_eq!(
            first,
            Frame {
                message: 28,
                consumed: 28
            }
        );
        let second = next_frame(&stream[28..]).unwrap().unwrap();
        assert_eq!(
            second,
            Frame {
                message: 9,
                consumed: 12
            }
        );
        let third = next_frame(&stream[40..]).unwrap().unwrap();
        assert_eq!(
            third,
            Frame {
                message: 20,
                consumed: 20
            }
        );
    }

    #[test]
    fn incomplete_until_the_padding_is_there() {
        let cd = [0x40, 0x01, 0x00, 0x01, 9, 0, 0, 0];
        for cut in 0..cd.len() {
            assert_eq!(next_frame(&cd[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(
            next_frame(&cd),
            Ok(Some(Frame {
                message: 5,
                consumed: 8
            }))
        );
    }

    #[test]
    fn garbage_bad_lengths_and_oversize_are_refused_from_the_header() {
        assert_eq!(next_frame(&[0x80]), Err(FramingError::NotTurn));
        assert_eq!(next_frame(&[0xC0, 0, 0, 0]), Err(FramingError::NotTurn));
        assert_eq!(next_frame(&[0, 1, 0, 3]), Err(FramingError::BadStunLength));
        assert_eq!(next_frame(&[0, 1, 0xff, 0xfc]), Err(FramingError::TooLarge));
        assert_eq!(next_frame(&[0x40, 0, 0x40, 0]), Err(FramingError::TooLarge));
        let largest = (MAX_STREAM_MESSAGE - 4) as u16;
        let header = [0x40, 0, (largest >> 8) as u8, largest as u8];
        assert_eq!(next_frame(&header), Ok(None));
    }

    proptest! {
        /// Whatever the bytes, a frame never claims more than the buffer holds or the
        /// maximum, and the message never exceeds what is consumed.
        #[test]
        fn frames_stay_within_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Some(frame)) = next_frame(&bytes) {
                prop_assert!(frame.consumed <= bytes.len());
                prop_assert!(frame.message <= frame.consumed);
                prop_assert!(frame.consumed <= MAX_STREAM_MESSAGE);
                prop_assert!(frame.consumed - frame.message < 4);
            }
        }
    }
}
