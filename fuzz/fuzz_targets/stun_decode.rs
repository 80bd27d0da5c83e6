//! `Message::decode` (RFC 8489 §5, §14) on arbitrary bytes, then every integrity and
//! fingerprint check and accessor on what it accepted. Nothing may panic; a message the
//! builder signs must verify.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::stun::{DecodeError, Message};

/// RFC 5769 §2.1's short-term password and §2.4's long-term key input, so the seeds' integrity
/// checks pass and the fuzzer explores past them.
const SHORT_TERM: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

fuzz_target!(|data: &[u8]| {
    match Message::decode(data) {
        Ok(msg) => {
            let _ = msg.verify_fingerprint();
            let _ = msg.verify_integrity(SHORT_TERM);
            let _ = msg.verify_integrity_sha256(SHORT_TERM);
            let _ = msg.verify_integrity(&[]);
            let _ = (msg.class(), msg.method(), msg.transaction_id());
            let _ = (msg.username(), msg.realm(), msg.nonce(), msg.software());
            let _ = (msg.lifetime(), msg.channel_number(), msg.data());
            let _ = (msg.xor_mapped_address(), msg.xor_relayed_address());
            let _ = msg.xor_peer_addresses().count();
            let _ = (msg.error_code(), msg.has_integrity(), msg.has_fingerprint());
            let _ = msg.unknown_comprehension_required();
            assert!(msg.raw().len() <= data.len());
        }
        Err(DecodeError::BadAttributes { .. }) | Err(DecodeError::NotStun) => {}
    }
});
