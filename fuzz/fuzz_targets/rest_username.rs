//! TURN REST usernames (`expiry:user`): key derivation never panics, accepts only unexpired
//! digit-prefixed names, and the quota key is the user part.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::auth::Credentials;

const NOW: u64 = 1_700_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(username) = std::str::from_utf8(data) else {
        return;
    };
    let mut credentials = Credentials::new("relay.fuzz");
    credentials.add_rest_secret("one");
    credentials.add_rest_secret("two");
    let keys = credentials.keys_for(username, NOW);
    if !keys.is_empty() {
        assert_eq!(keys.len(), 2);
        let expiry = username.split_once(':').map_or(username, |(e, _)| e);
        assert!(expiry.bytes().all(|b| b.is_ascii_digit()), "{username:?}");
        assert!(expiry.parse::<u64>().is_ok_and(|e| e > NOW), "{username:?}");
    }
    let user = credentials.quota_user(username);
    assert!(username.ends_with(user), "{username:?} -> {user:?}");
    assert!(!user.is_empty() || username.is_empty());
});
