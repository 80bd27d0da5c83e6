//! Bad input: garbage, malformed attributes (400, RFC 8489 §6.3.1) and unknown
//! comprehension-required attributes (420, RFC 8489 §6.3.1.1).

use super::harness::*;

/// RFC 8489 §6.3.1.1: unknown comprehension-required attributes → 420 with UNKNOWN-ATTRIBUTES,
/// signed; unknown comprehension-optional ones are ignored.
#[test]
fn unknown_required_attribute_is_420() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let attrs = [
        Attribute::RequestedTransport(UDP),
        Attribute::Unknown {
            typ: 0x0041,
            value: b"x",
        },
        Attribute::Unknown {
            typ: 0x7fff,
            value: b"",
        },
    ];
    let reply = h.request(&mut c, Method::ALLOCATE, &attrs);
    let msg = expect_error(&reply, Method::ALLOCATE, 420, Some(&c.key));
    assert!(msg
        .attributes()
        .contains(&Attribute::UnknownAttributes(vec![0x0041, 0x7fff])));
    assert!(h.server.allocations().next().is_none());

    let optional = [
        Attribute::RequestedTransport(UDP),
        Attribute::Unknown {
            typ: 0xc0de,
            value: b"ignored",
        },
    ];
    h.allocate_with(&mut c, &optional);
}

/// Garbage and truncated datagrams: no command, no panic.
#[test]
fn garbage_is_ignored() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    let (_, relayed) = h.allocate(&mut c);
    h.channel_bind(&mut c, 0x4000, peer1());
    let tid = c.tid();
    let valid = c.build(tid, Method::REFRESH, &[Attribute::Lifetime(600)], true);
    let mut cases: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![0x40],
        vec![0x40, 0x00, 0x00],
        vec![0xff; 40],
        vec![0x80, 1, 2, 3],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ];
    // Every truncation of a valid signed request.
    cases.extend((0..valid.len()).map(|n| valid[..n].to_vec()));
    // Wrong magic cookie.
    let mut bad_cookie = valid.clone();
    bad_cookie[4] ^= 0xff;
    cases.push(bad_cookie);
    // Length field not matching the datagram.
    let mut long = valid.clone();
    long.extend([0u8; 4]);
    cases.push(long);
    for case in &cases {
        assert!(h.client_sends(&c, case).is_empty(), "{case:?}");
    }
    // A FINGERPRINT that does not match means it is not STUN: dropped.
    let mut bad_fp = valid.clone();
    let last = bad_fp.len() - 1;
    bad_fp[last] ^= 1;
    assert!(h.client_sends(&c, &bad_fp).is_empty());
    // Responses and non-Send indications from clients are dropped.
    for class in [Class::Success, Class::Error, Class::Indication] {
        let bytes = MessageBuilder::new(class, Method::BINDING, c.tid()).finish(None, true);
        assert!(h.client_sends(&c, &bytes).is_empty(), "{class:?}");
    }
    // Garbage from peers is relayed (it is just data), but not to unknown relayed addresses.
    assert!(h
        .peer_sends(sa("203.0.113.1:1"), peer1(), &[0xff; 8])
        .is_empty());
    assert_eq!(h.peer_sends(relayed, peer1(), &[]).len(), 1);
    // The server is still healthy.
    h.refresh(&mut c, Some(600));
}

/// RFC 8489 §6.3.1: a request whose attributes do not parse gets 400 (unsigned: nothing could
/// be authenticated), with its transaction id.
#[test]
fn malformed_attributes_are_400() {
    let mut h = Harness::new();
    let mut c = Client::new("192.0.2.10:50000", ALICE);
    h.allocate(&mut c);

    let raw = |tid: TransactionId, method: Method, body: &[u8]| -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&crate::stun::message_type(Class::Request, method).to_be_bytes());
        out.extend_from_slice(&u16::try_from(body.len()).expect("short").to_be_bytes());
        out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        out.extend_from_slice(&tid.0);
        out.extend_from_slice(body);
        out
    };
    let bodies: Vec<(Method, Vec<u8>)> = vec![
        // LIFETIME with a 3-byte value.
        (Method::REFRESH, vec![0x00, 0x0D, 0x00, 0x03, 0, 0, 1, 0]),
        // XOR-PEER-ADDRESS of family 3.
        (
            Method::CREATE_PERMISSION,
            vec![0x00, 0x12, 0x00, 0x08, 0x00, 0x03, 0, 0, 1, 2, 3, 4],
        ),
        // CHANNEL-NUMBER of 2 bytes.
        (
            Method::CHANNEL_BIND,
            vec![0x00, 0x0C, 0x00, 0x02, 0x40, 0x00, 0, 0],
        ),
        // Attribute length past the end of the message.
        (Method::ALLOCATE, vec![0x00, 0x19, 0x00, 0x40, 17, 0, 0, 0]),
        // USERNAME that is not UTF-8.
        (
            Method::ALLOCATE,
            vec![0x00, 0x06, 0x00, 0x02, 0xff, 0xfe, 0, 0],
        ),
        // Something after FINGERPRINT.
        (
            Method::BINDING,
            vec![0x80, 0x28, 0x00, 0x04, 0, 0, 0, 0, 0x80, 0x22, 0x00, 0x00],
        ),
    ];
    for (method, body) in bodies {
        let tid = c.tid();
        let bytes = raw(tid, method, &body);
        let commands = h.client_sends(&c, &bytes);
        let [Command::SendToClient { payload, .. }] = commands.as_slice() else {
            panic!("expected one 400 for {method:?}, got {commands:?}");
        };
        let msg = Message::decode(payload).expect("decodes");
        assert_eq!(msg.transaction_id(), tid);
        expect_error(payload, method, 400, None);
    }
    // A malformed indication gets nothing.
    let mut bytes = raw(c.tid(), Method::SEND, &[0x00, 0x12, 0x00, 0x01, 0, 0, 0, 0]);
    bytes[1] |= 0x10; // indication class bit
    assert!(h.client_sends(&c, &bytes).is_empty());
    // Requests for methods the server does not serve: 400.
    for method in [
        Method::SEND,
        Method::DATA,
        Method::new(0x0AB).expect("method"),
    ] {
        let tid = c.tid();
        let bytes = c.build(tid, method, &[], true);
        expect_error(&h.transact(&c, &bytes, tid), method, 400, None);
    }
    // The allocation is untouched.
    h.refresh(&mut c, None);
}
