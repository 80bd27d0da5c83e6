//! ChannelData (RFC 8656 §12.4) decoding: never panics, and what decodes re-encodes to a
//! datagram that decodes to the same channel and payload.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::channel_data::{classify, ChannelData, PacketKind};

fuzz_target!(|data: &[u8]| {
    let kind = classify(data);
    if let Ok(cd) = ChannelData::decode(data) {
        assert_eq!(kind, PacketKind::ChannelData);
        for pad in [false, true] {
            let encoded = cd.encode(pad);
            let again = ChannelData::decode(&encoded).expect("re-encoded ChannelData decodes");
            assert_eq!((again.channel, again.data), (cd.channel, cd.data));
        }
    }
});
