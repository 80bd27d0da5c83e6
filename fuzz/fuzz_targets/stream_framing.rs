//! Stream framing (RFC 8656 §5, §12.5): a TCP/TLS byte stream cut into reads of arbitrary
//! sizes frames into the same messages as the whole stream at once; no frame claims more than
//! the buffer or the maximum; each STUN frame is exactly one STUN message's length and each
//! ChannelData frame one padded ChannelData message; an error is final and depends only on
//! the header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::channel_data::{classify, ChannelData, PacketKind};
use relay_proto::framing::{next_frame, Frame, MAX_STREAM_MESSAGE};

/// Frames `stream` as a connection does, receiving it in reads of the given sizes; returns
/// the frames and whether the stream ended in an error.
fn frame_in_reads(stream: &[u8], cuts: &[u8]) -> (Vec<Frame>, bool) {
    let mut buffered = Vec::new();
    let mut frames = Vec::new();
    let mut at = 0;
    let mut cut = cuts.iter().cycle();
    while at < stream.len() {
        let size = usize::from(*cut.next().unwrap_or(&255)).max(1);
        let end = (at + size).min(stream.len());
        buffered.extend_from_slice(&stream[at..end]);
        at = end;
        loop {
            match next_frame(&buffered) {
                Ok(Some(frame)) => {
                    frames.push(frame);
                    buffered.drain(..frame.consumed);
                }
                Ok(None) => break,
                Err(_) => return (frames, true),
            }
        }
    }
    (frames, false)
}

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (stream, cuts) = input;
    let whole = frame_in_reads(&stream, &[255, 255, 255, 255]);
    let pieces = frame_in_reads(&stream, if cuts.is_empty() { &[1] } else { &cuts });
    assert_eq!(whole, pieces, "framing depends on how the stream was read");
    let mut at = 0;
    for frame in &whole.0 {
        assert!(frame.message <= frame.consumed && frame.consumed <= MAX_STREAM_MESSAGE);
        assert!(frame.consumed - frame.message < 4);
        let message = &stream[at..at + frame.message];
        match classify(message) {
            PacketKind::ChannelData => {
                let cd = ChannelData::decode(message).expect("a ChannelData frame decodes");
                assert_eq!(4 + cd.data.len(), frame.message);
                assert_eq!(frame.consumed % 4, 0, "padded to 4 on a stream");
            }
            _ => {
                assert_eq!(message[0] >> 6, 0, "a frame is STUN or ChannelData");
                let length = usize::from(u16::from_be_bytes([message[2], message[3]]));
                assert_eq!(20 + length, frame.message);
            }
        }
        at += frame.consumed;
    }
});
