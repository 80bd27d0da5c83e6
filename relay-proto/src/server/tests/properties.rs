//! Property tests: arbitrary datagrams from clients and peers never panic, never disturb an
//! allocation, and the server keeps answering.

use proptest::prelude::*;

use super::harness::*;

/// Attribute types worth aiming random values at: the ones the codec and server interpret.
const INTERESTING_TYPES: &[u16] = &[
    attr_type::USERNAME,
    attr_type::MESSAGE_INTEGRITY,
    attr_type::ERROR_CODE,
    attr_type::UNKNOWN_ATTRIBUTES,
    attr_type::CHANNEL_NUMBER,
    attr_type::LIFETIME,
    attr_type::XOR_PEER_ADDRESS,
    attr_type::DATA,
    attr_type::REALM,
    attr_type::NONCE,
    attr_type::XOR_RELAYED_ADDRESS,
    attr_type::REQUESTED_ADDRESS_FAMILY,
    attr_type::EVEN_PORT,
    attr_type::REQUESTED_TRANSPORT,
    attr_type::DONT_FRAGMENT,
    attr_type::MESSAGE_INTEGRITY_SHA256,
    attr_type::XOR_MAPPED_ADDRESS,
    attr_type::RESERVATION_TOKEN,
    attr_type::ADDITIONAL_ADDRESS_FAMILY,
    attr_type::ADDRESS_ERROR_CODE,
    attr_type::ICMP,
    attr_type::SOFTWARE,
    attr_type::FINGERPRINT,
];

/// Arbitrary bytes, STUN-shaped messages with random attributes, and ChannelData-shaped
/// datagrams.
fn datagram() -> impl Strategy<Value = Vec<u8>> {
    let attr_type = prop_oneof![proptest::sample::select(INTERESTING_TYPES), any::<u16>(),];
    let attribute = (attr_type, proptest::collection::vec(any::<u8>(), 0..24));
    let stun = (
        0u16..0x4000,
        any::<[u8; 12]>(),
        proptest::collection::vec(attribute, 0..6),
    )
        .prop_map(|(msg_type, tid, attrs)| {
            let mut body = Vec::new();
            for (typ, value) in attrs {
                body.extend_from_slice(&typ.to_be_bytes());
                body.extend_from_slice(&u16::try_from(value.len()).unwrap_or(0).to_be_bytes());
                body.extend_from_slice(&value);
                while body.len() % 4 != 0 {
                    body.push(0);
                }
            }
            let mut out = Vec::new();
            out.extend_from_slice(&msg_type.to_be_bytes());
            out.extend_from_slice(&u16::try_from(body.len()).unwrap_or(0).to_be_bytes());
            out.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
            out.extend_from_slice(&tid);
            out.extend_from_slice(&body);
            out
        });
    let channel_data = (
        0x3ff0u16..0x5010,
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(channel, len, data)| {
            let mut out = Vec::new();
            out.extend_from_slice(&channel.to_be_bytes());
            // Mostly honest lengths, sometimes lies.
            let len = if len % 4 == 0 {
                len
            } else {
                u16::try_from(data.len()).unwrap_or(0)
            };
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&data);
            out
        });
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..80),
        stun,
        channel_data,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary datagrams from the client and from peers (known or not) never panic, never
    /// touch the allocation, and the server keeps answering Binding and signed Refresh.
    #[test]
    fn arbitrary_datagrams_never_break_the_server(
        inputs in proptest::collection::vec(
            (any::<bool>(), datagram(), 0u8..4, 0u16..3000),
            1..12,
        ),
    ) {
        let mut h = Harness::new();
        let mut c = Client::new("192.0.2.10:50000", ALICE);
        let (id, relayed) = h.allocate(&mut c);
        h.channel_bind(&mut c, 0x4000, peer1());
        let peers = [peer1(), peer2(), sa("198.51.100.7:1"), peer_v6()];
        for (from_client, bytes, who, millis) in inputs {
            h.advance(Duration::from_millis(u64::from(millis)));
            let commands = if from_client {
                h.client_sends(&c, &bytes)
            } else {
                let target = if who % 2 == 0 { relayed } else { sa("203.0.113.1:1") };
                h.peer_sends(target, peers[usize::from(who)], &bytes)
            };
            for command in commands {
                // Nothing unauthenticated may change state: only data and answers come out.
                match command {
                    Command::SendToClient { listener, client, .. } => {
                        prop_assert_eq!((listener, client), (c.listener, c.addr));
                    }
                    Command::SendToPeer { relayed: from, peer, .. } => {
                        prop_assert_eq!((from, peer.ip()), (relayed, peer1().ip()));
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
        }
        let info = h.server.allocations().next().expect("allocation survives");
        prop_assert_eq!(info.id, id);
        prop_assert_eq!(info.channels, vec![(0x4000, peer1())]);

        let tid = c.tid();
        let bytes = MessageBuilder::new(Class::Request, Method::BINDING, tid).finish(None, true);
        let reply = h.transact(&c, &bytes, tid);
        let msg = Message::decode(&reply).expect("decodes");
        prop_assert_eq!(msg.class(), Class::Success);
        prop_assert_eq!(msg.xor_mapped_address(), Some(c.addr));
        h.refresh(&mut c, Some(600));
    }

    /// The same with no allocation at all, from arbitrary sources.
    #[test]
    fn arbitrary_datagrams_without_state(
        inputs in proptest::collection::vec((datagram(), any::<u16>(), any::<u16>()), 1..12),
    ) {
        let mut h = Harness::new();
        for (bytes, port, relay_port) in inputs {
            let client = SocketAddr::new(ip("192.0.2.10"), port);
            // No allocation: nothing may be relayed.
            let forward = h.server.handle_client_datagram(client, listener(), &bytes, h.now);
            prop_assert_eq!(forward, None);
            let relayed = SocketAddr::new(relay_v4(), relay_port);
            let forward = h.server.handle_peer_datagram(relayed, peer1(), &bytes, h.now);
            prop_assert_eq!(forward, None);
            for command in h.drain() {
                let is_reply =
                    matches!(command, Command::SendToClient { client: to, .. } if to == client);
                prop_assert!(is_reply, "unexpected {:?}", command);
            }
        }
        prop_assert_eq!(h.server.poll_timeout(), None);
        let mut c = Client::new("192.0.2.99:4000", ALICE);
        let tid = c.tid();
        let bytes = MessageBuilder::new(Class::Request, Method::BINDING, tid).finish(None, true);
        h.transact(&c, &bytes, tid);
        h.allocate(&mut c);
    }
}
