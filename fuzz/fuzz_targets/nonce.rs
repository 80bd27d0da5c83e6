//! Stateless nonces (RFC 8489 §9.2): an arbitrary NONCE never panics the check and is never
//! taken for a valid one, and an issued nonce is valid for its client only.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use relay_proto::auth::{NonceCheck, NonceIssuer};

fuzz_target!(|data: &[u8]| {
    let epoch = Instant::now();
    let issuer = NonceIssuer::new([7; 32], Duration::from_secs(3600), epoch);
    let (head, rest) = data.split_at(data.len().min(4));
    let mut word = [0u8; 4];
    word[..head.len()].copy_from_slice(head);
    let offset = Duration::from_millis(u64::from(u32::from_be_bytes(word)));
    let now = epoch + offset;
    let client = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 1), 40000));
    if let Ok(nonce) = std::str::from_utf8(rest) {
        // The secret is not in the input: forging a valid nonce means breaking HMAC-SHA256.
        let issued = issuer.issue(client, epoch);
        if nonce != issued {
            assert_ne!(
                issuer.check(nonce, client, now),
                NonceCheck::Valid,
                "{nonce:?}"
            );
        }
    }
    let fresh = issuer.issue(client, now);
    assert_eq!(issuer.check(&fresh, client, now), NonceCheck::Valid);
    let other = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 2), 40000));
    assert_eq!(issuer.check(&fresh, other, now), NonceCheck::Invalid);
});
