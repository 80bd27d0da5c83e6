//! Codec tests: RFC 5769 test vectors, re-encoding, property tests.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use md5::{Digest, Md5};
use proptest::prelude::*;

use super::*;

fn hex(s: &str) -> Vec<u8> {
    let digits: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    hex::decode(digits).expect("test vector hex")
}

/// RFC 5769 §2.1 Sample Request (short-term credentials).
const SAMPLE_REQUEST: &str = "
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf";

/// RFC 5769 §2.2 Sample IPv4 Response.
const SAMPLE_IPV4_RESPONSE: &str = "
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96";

/// RFC 5769 §2.3 Sample IPv6 Response.
const SAMPLE_IPV6_RESPONSE: &str = "
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c";

/// RFC 5769 §2.4 Sample Request with Long-Term Authentication.
const SAMPLE_LONG_TERM_REQUEST: &str = "
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66";

const SHORT_TERM_PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";
const LT_USERNAME: &str = "\u{30de}\u{30c8}\u{30ea}\u{30c3}\u{30af}\u{30b9}";

fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(format!("{username}:{realm}:{password}").as_bytes());
    h.finalize().into()
}

const VECTOR_TID: TransactionId = TransactionId([
    0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
]);

#[test]
fn message_type_interleaving() {
    for (class, method, t) in [
        (Class::Request, Method::BINDING, 0x0001),
        (Class::Success, Method::BINDING, 0x0101),
        (Class::Error, Method::BINDING, 0x0111),
        (Class::Request, Method::ALLOCATE, 0x0003),
        (Class::Error, Method::ALLOCATE, 0x0113),
        (Class::Indication, Method::SEND, 0x0016),
        (Class::Indication, Method::DATA, 0x0017),
        (Class::Request, Method::CHANNEL_BIND, 0x0009),
        (Class::Success, Method::CHANNEL_BIND, 0x0109),
    ] {
        assert_eq!(message_type(class, method), t);
        assert_eq!(split_message_type(t), (class, method));
    }
}

#[test]
fn rfc5769_sample_request() {
    let bytes = hex(SAMPLE_REQUEST);
    let m = Message::decode(&bytes).expect("decodes");
    assert_eq!(m.class(), Class::Request);
    assert_eq!(m.method(), Method::BINDING);
    assert_eq!(m.transaction_id(), VECTOR_TID);
    assert_eq!(m.software(), Some("STUN test client"));
    assert_eq!(m.username(), Some("evtj:h6vY"));
    // PRIORITY (0x0024) is comprehension-required and unknown to a TURN server.
    assert_eq!(m.unknown_comprehension_required(), &[0x0024]);
    assert_eq!(m.verify_fingerprint(), Some(true));
    assert_eq!(m.verify_integrity(SHORT_TERM_PASSWORD), Ok(()));
    assert_eq!(m.verify_integrity(b"wrong"), Err(IntegrityError::Mismatch));
    assert_eq!(
        m.verify_integrity_sha256(SHORT_TERM_PASSWORD),
        Err(IntegrityError::Missing)
    );
}

#[test]
fn rfc5769_sample_responses() {
    for (vector, want) in [
        (SAMPLE_IPV4_RESPONSE, "192.0.2.1:32853"),
        (
            SAMPLE_IPV6_RESPONSE,
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853",
        ),
    ] {
        let bytes = hex(vector);
        let m = Message::decode(&bytes).expect("decodes");
        assert_eq!((m.class(), m.method()), (Class::Success, Method::BINDING));
        assert_eq!(m.software(), Some("test vector"));
        let want: SocketAddr = want.parse().expect("addr");
        assert_eq!(m.xor_mapped_address(), Some(want));
        assert_eq!(m.verify_fingerprint(), Some(true), "{want}");
        assert_eq!(m.verify_integrity(SHORT_TERM_PASSWORD), Ok(()), "{want}");

        // Re-encode byte for byte (the vectors pad with 0x20).
        let mut b = MessageBuilder::new(Class::Success, Method::BINDING, VECTOR_TID);
        b.padding_byte(0x20)
            .add(&Attribute::Software("test vector"))
            .add(&Attribute::XorMappedAddress(want));
        assert_eq!(b.finish(Some(SHORT_TERM_PASSWORD), true), bytes, "{want}");
    }
}

#[test]
fn rfc5769_sample_request_reencodes() {
    let bytes = hex(SAMPLE_REQUEST);
    let m = Message::decode(&bytes).expect("decodes");
    let mut b = MessageBuilder::new(Class::Request, Method::BINDING, m.transaction_id());
    b.padding_byte(0x20);
    for a in m.attributes() {
        if !matches!(
            a,
            Attribute::MessageIntegrity(_) | Attribute::Fingerprint(_)
        ) {
            b.add(a);
        }
    }
    assert_eq!(b.finish(Some(SHORT_TERM_PASSWORD), true), bytes);
}

#[test]
fn rfc5769_long_term_request() {
    let bytes = hex(SAMPLE_LONG_TERM_REQUEST);
    let m = Message::decode(&bytes).expect("decodes");
    assert_eq!(m.username(), Some(LT_USERNAME));
    assert_eq!(m.realm(), Some("example.org"));
    assert_eq!(m.nonce(), Some("f//499k954d6OL34oL9FSTvy64sA"));
    assert_eq!(m.verify_fingerprint(), None);
    let key = long_term_key(LT_USERNAME, "example.org", "TheMatrIX");
    assert_eq!(m.verify_integrity(&key), Ok(()));
    let wrong = long_term_key(LT_USERNAME, "example.org", "TheMatrix");
    assert_eq!(m.verify_integrity(&wrong), Err(IntegrityError::Mismatch));

    // Re-encodes byte for byte (zero padding here).
    let mut b = MessageBuilder::new(Class::Request, Method::BINDING, m.transaction_id());
    b.add(&Attribute::Username(LT_USERNAME))
        .add(&Attribute::Nonce("f//499k954d6OL34oL9FSTvy64sA"))
        .add(&Attribute::Realm("example.org"));
    assert_eq!(b.finish(Some(&key), false), bytes);
}

#[test]
fn changed_byte_breaks_fingerprint_and_integrity() {
    let mut bytes = hex(SAMPLE_REQUEST);
    bytes[30] ^= 1; // inside SOFTWARE
    let m = Message::decode(&bytes).expect("still decodes");
    assert_eq!(m.verify_fingerprint(), Some(false));
    assert_eq!(
        m.verify_integrity(SHORT_TERM_PASSWORD),
        Err(IntegrityError::Mismatch)
    );
}

#[test]
fn attributes_after_integrity_are_ignored() {
    let key = b"key";
    let mut b = MessageBuilder::new(Class::Request, Method::ALLOCATE, TransactionId([1; 12]));
    b.add(&Attribute::Username("u"));
    let mut bytes = b.finish(Some(key), false);
    // Append LIFETIME after MESSAGE-INTEGRITY and fix the header length.
    bytes.extend_from_slice(&[0x00, 0x0d, 0x00, 0x04, 0, 0, 0, 9]);
    let len = (bytes.len() - HEADER_LEN) as u16;
    bytes[2..4].copy_from_slice(&len.to_be_bytes());
    let m = Message::decode(&bytes).expect("decodes");
    assert_eq!(m.lifetime(), None);
    assert_eq!(m.verify_integrity(key), Ok(()));
}

#[test]
fn sha256_integrity_round_trip() {
    let key = [7u8; 16];
    let mut b = MessageBuilder::new(Class::Request, Method::REFRESH, TransactionId([2; 12]));
    b.add(&Attribute::Lifetime(0));
    let bytes = b.finish_with(Some(Integrity::Sha256(&key)), true);
    let m = Message::decode(&bytes).expect("decodes");
    assert_eq!(m.verify_fingerprint(), Some(true));
    assert_eq!(m.verify_integrity_sha256(&key), Ok(()));
    assert_eq!(
        m.verify_integrity_sha256(&[8u8; 16]),
        Err(IntegrityError::Mismatch)
    );
    assert_eq!(m.verify_integrity(&key), Err(IntegrityError::Missing));
}

#[test]
fn broken_attributes_still_yield_header() {
    let mut b = MessageBuilder::new(Class::Request, Method::ALLOCATE, TransactionId([3; 12]));
    b.add_raw(attr_type::REQUESTED_TRANSPORT, &[17, 0, 0]); // wrong length
    let bytes = b.finish(None, false);
    match Message::decode(&bytes) {
        Err(DecodeError::BadAttributes {
            method,
            class,
            transaction_id,
            ..
        }) => {
            assert_eq!(method, Method::ALLOCATE);
            assert_eq!(class, Class::Request);
            assert_eq!(transaction_id, TransactionId([3; 12]));
        }
        other => panic!("expected BadAttributes, got {other:?}"),
    }
    // An attribute running past the end.
    let mut bytes = MessageBuilder::new(Class::Request, Method::BINDING, TransactionId([4; 12]))
        .finish(None, false);
    bytes.extend_from_slice(&[0x00, 0x06, 0x00, 0x08, 1, 2, 3, 4]);
    bytes[3] = 8;
    assert!(matches!(
        Message::decode(&bytes),
        Err(DecodeError::BadAttributes {
            error: AttributeError::Truncated,
            ..
        })
    ));
}

#[test]
fn not_stun() {
    assert_eq!(Message::decode(&[]), Err(DecodeError::NotStun));
    assert_eq!(Message::decode(&[0u8; 19]), Err(DecodeError::NotStun));
    let mut bytes = hex(SAMPLE_REQUEST);
    bytes[4] ^= 1;
    assert_eq!(Message::decode(&bytes), Err(DecodeError::NotStun));
    let mut bytes = hex(SAMPLE_REQUEST);
    bytes[0] |= 0x40;
    assert_eq!(Message::decode(&bytes), Err(DecodeError::NotStun));
    let mut bytes = hex(SAMPLE_REQUEST);
    bytes.push(0);
    assert_eq!(Message::decode(&bytes), Err(DecodeError::NotStun));
}

#[test]
fn turn_attributes_round_trip() {
    let tid = TransactionId([9; 12]);
    let attrs = vec![
        Attribute::XorPeerAddress("203.0.113.5:4000".parse().expect("addr")),
        Attribute::XorRelayedAddress("[2001:db8::7]:50000".parse().expect("addr")),
        Attribute::MappedAddress("192.0.2.9:1".parse().expect("addr")),
        Attribute::ChannelNumber(0x4001),
        Attribute::Lifetime(600),
        Attribute::Data(b"hello"),
        Attribute::RequestedTransport(17),
        Attribute::DontFragment,
        Attribute::EvenPort(true),
        Attribute::ReservationToken([1, 2, 3, 4, 5, 6, 7, 8]),
        Attribute::RequestedAddressFamily(AddressFamily::V6),
        Attribute::AdditionalAddressFamily(AddressFamily::V6),
        Attribute::AddressErrorCode {
            family: AddressFamily::V6,
            error: ErrorCode {
                code: 440,
                reason: "Address Family not Supported",
            },
        },
        Attribute::Icmp {
            icmp_type: 3,
            code: 1,
            data: 77,
        },
        Attribute::AlternateServer("198.18.0.2:3478".parse().expect("addr")),
        Attribute::AlternateServer("[2001:db8::9]:3478".parse().expect("addr")),
        Attribute::AlternateDomain("turn-b.example.net"),
        Attribute::ErrorCode(ErrorCode {
            code: 438,
            reason: "Stale Nonce",
        }),
        Attribute::UnknownAttributes(vec![0x0024, 0x0031]),
        Attribute::Unknown {
            typ: 0x8055,
            value: b"xyz",
        },
    ];
    let mut b = MessageBuilder::new(Class::Error, Method::ALLOCATE, tid);
    for a in &attrs {
        b.add(a);
    }
    let bytes = b.finish(Some(b"k"), true);
    let m = Message::decode(&bytes).expect("decodes");
    let got: Vec<_> = m
        .attributes()
        .iter()
        .filter(|a| {
            !matches!(
                a,
                Attribute::MessageIntegrity(_) | Attribute::Fingerprint(_)
            )
        })
        .cloned()
        .collect();
    assert_eq!(got, attrs);
    assert_eq!(m.error_code(), Some(438));
    assert!(m.unknown_comprehension_required().is_empty());
}

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)),
    ]
}

/// Owned form of an attribute for generation (strategies cannot hand out borrows).
#[derive(Clone, Debug)]
enum Owned {
    Addr(u8, SocketAddr),
    Text(u8, String),
    Bytes(Vec<u8>),
    Error(u16, String),
    Unknowns(Vec<u16>),
    Num(u8, u32),
    Flag(bool),
    Token([u8; 8]),
    Family(u8, u8),
    Raw(u16, Vec<u8>),
}

impl Owned {
    fn as_attr(&self) -> Attribute<'_> {
        match self {
            Owned::Addr(0, a) => Attribute::MappedAddress(*a),
            Owned::Addr(1, a) => Attribute::XorMappedAddress(*a),
            Owned::Addr(2, a) => Attribute::XorPeerAddress(*a),
            Owned::Addr(_, a) => Attribute::XorRelayedAddress(*a),
            Owned::Text(0, s) => Attribute::Username(s),
            Owned::Text(1, s) => Attribute::Realm(s),
            Owned::Text(2, s) => Attribute::Nonce(s),
            Owned::Text(_, s) => Attribute::Software(s),
            Owned::Bytes(d) => Attribute::Data(d),
            Owned::Error(code, reason) => Attribute::ErrorCode(ErrorCode {
                code: *code,
                reason,
            }),
            Owned::Unknowns(v) => Attribute::UnknownAttributes(v.clone()),
            Owned::Num(0, n) => Attribute::ChannelNumber(*n as u16),
            Owned::Num(1, n) => Attribute::Lifetime(*n),
            Owned::Num(_, n) => Attribute::RequestedTransport(*n as u8),
            Owned::Flag(r) => Attribute::EvenPort(*r),
            Owned::Token(t) => Attribute::ReservationToken(*t),
            Owned::Family(0, f) => Attribute::RequestedAddressFamily(AddressFamily::from_byte(*f)),
            Owned::Family(_, f) => Attribute::AdditionalAddressFamily(AddressFamily::from_byte(*f)),
            Owned::Raw(t, v) => Attribute::Unknown { typ: *t, value: v },
        }
    }
}

fn arb_attr() -> impl Strategy<Value = Owned> {
    prop_oneof![
        (0u8..4, arb_addr()).prop_map(|(k, a)| Owned::Addr(k, a)),
        (0u8..4, "[a-zA-Z0-9 \u{30de}]{0,40}").prop_map(|(k, s)| Owned::Text(k, s)),
        proptest::collection::vec(any::<u8>(), 0..100).prop_map(Owned::Bytes),
        (300u16..700, "[a-z ]{0,20}").prop_map(|(c, r)| Owned::Error(c, r)),
        proptest::collection::vec(any::<u16>(), 0..6).prop_map(Owned::Unknowns),
        (0u8..3, any::<u32>()).prop_map(|(k, n)| Owned::Num(k, n)),
        any::<bool>().prop_map(Owned::Flag),
        any::<[u8; 8]>().prop_map(Owned::Token),
        (0u8..2, any::<u8>()).prop_map(|(k, f)| Owned::Family(k, f)),
        // Types this codec does not know (0x0030..0x003F and 0x8030..0x803F are unassigned here).
        (
            prop_oneof![0x0030u16..0x0040, 0x8030u16..0x8040],
            proptest::collection::vec(any::<u8>(), 0..30)
        )
            .prop_map(|(t, v)| Owned::Raw(t, v)),
    ]
}

proptest! {
    #[test]
    fn prop_encode_decode_round_trip(
        class in prop_oneof![Just(Class::Request), Just(Class::Indication), Just(Class::Success), Just(Class::Error)],
        method in 0u16..=0xfff,
        tid in any::<[u8; 12]>(),
        attrs in proptest::collection::vec(arb_attr(), 0..12),
        integrity in proptest::option::of(proptest::collection::vec(any::<u8>(), 1..40)),
        sha256 in any::<bool>(),
        fingerprint in any::<bool>(),
    ) {
        let method = Method::new(method).expect("12 bits");
        let tid = TransactionId(tid);
        let mut b = MessageBuilder::new(class, method, tid);
        for a in &attrs {
            b.add(&a.as_attr());
        }
        let integ = integrity.as_deref().map(|k| if sha256 { Integrity::Sha256(k) } else { Integrity::Sha1(k) });
        let bytes = b.finish_with(integ, fingerprint);
        let m = Message::decode(&bytes).expect("own encoding decodes");
        prop_assert_eq!(m.class(), class);
        prop_assert_eq!(m.method(), method);
        prop_assert_eq!(m.transaction_id(), tid);
        let got: Vec<_> = m.attributes().iter().filter(|a| !matches!(a,
            Attribute::MessageIntegrity(_) | Attribute::MessageIntegritySha256(_) | Attribute::Fingerprint(_))).cloned().collect();
        let want: Vec<_> = attrs.iter().map(Owned::as_attr).collect();
        prop_assert_eq!(&got, &want);
        prop_assert_eq!(m.verify_fingerprint(), fingerprint.then_some(true));
        if let Some(k) = &integrity {
            if sha256 {
                prop_assert_eq!(m.verify_integrity_sha256(k), Ok(()));
            } else {
                prop_assert_eq!(m.verify_integrity(k), Ok(()));
            }
        }
        // Re-encoding the decoded message reproduces the bytes.
        let mut again = MessageBuilder::new(class, method, tid);
        for a in &want {
            again.add(a);
        }
        prop_assert_eq!(again.finish_with(integ, fingerprint), bytes);
    }

    #[test]
    fn prop_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(m) = Message::decode(&bytes) {
            let _ = m.verify_integrity(b"k");
            let _ = m.verify_integrity_sha256(b"k");
            let _ = m.verify_fingerprint();
        }
    }

    #[test]
    fn prop_decode_mutated_valid_message_never_panics(
        attrs in proptest::collection::vec(arb_attr(), 0..6),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let mut b = MessageBuilder::new(Class::Request, Method::ALLOCATE, TransactionId([5; 12]));
        for a in &attrs {
            b.add(&a.as_attr());
        }
        let mut bytes = b.finish(Some(b"key"), true);
        let n = bytes.len();
        for (at, x) in flips {
            if let Some(byte) = bytes.get_mut(HEADER_LEN + at % (n - HEADER_LEN).max(1)) {
                *byte ^= x;
            }
        }
        if let Ok(m) = Message::decode(&bytes) {
            let _ = m.verify_integrity(b"key");
            let _ = m.verify_fingerprint();
        }
    }
}
