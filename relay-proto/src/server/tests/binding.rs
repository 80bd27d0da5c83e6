//! Binding (RFC 8489 §6.3.1): the reflexive address, unauthenticated, rate limited.

use super::harness::*;

/// RFC 8489 §6.3.1: XOR-MAPPED-ADDRESS of the source, FINGERPRINT, no authentication.
#[test]
fn binding_reflects_source_address() {
    let mut h = Harness::new();
    for addr in ["192.0.2.10:50000", "[2001:db8:1::5]:61000"] {
        let mut c = Client::new(addr, ALICE);
        let tid = c.tid();
        // No FINGERPRINT in the request: the Binding response has one anyway.
        let bytes = MessageBuilder::new(Class::Request, Method::BINDING, tid).finish(None, false);
        let reply = h.transact(&c, &bytes, tid);
        let msg = Message::decode(&reply).expect("decodes");
        assert_eq!(
            (msg.class(), msg.method()),
            (Class::Success, Method::BINDING)
        );
        assert_eq!(msg.xor_mapped_address(), Some(c.addr));
        assert!(!msg.has_integrity());
        assert!(msg.has_fingerprint());
    }
}

/// RFC 8489 §6.3.1.1: an unknown comprehension-required attribute draws 420 listing it.
#[test]
fn binding_with_unknown_required_attribute_is_420() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let tid = c.tid();
    let mut b = MessageBuilder::new(Class::Request, Method::BINDING, tid);
    b.add_raw(0x0077, b"????").add_raw(0x8077, b"optional");
    let reply = h.transact(&c, &b.finish(None, true), tid);
    let msg = expect_error(&reply, Method::BINDING, 420, None);
    assert!(msg
        .attributes()
        .contains(&Attribute::UnknownAttributes(vec![0x0077])));
}
