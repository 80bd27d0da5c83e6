//! Packet fixtures through BPF_PROG_TEST_RUN: input frame → expected verdict (and counter) →
//! exact expected output frame, for the XDP and the TC entry point.
//!
//! The runs happen inside the relay namespace of a three-namespace lab with IP forwarding off:
//! next hops are resolved by the relay's own resolver (rtnetlink) from real interfaces, routes
//! and (permanent) neighbour entries, so the expected MAC addresses are the lab's fixed ones.
//! Expected frames are built from scratch with complete checksums, so every incremental
//! checksum update is checked against full recomputation.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use relay::fastpath::{AttachMode, ChannelBinding, FastPath, PermissionBinding, TestProgram};
use relay_common::Reason;
use relay_tests::{
    fastpath::{lab_policy, Installer},
    lab::{
        mac_string, ThreeHosts, CLIENT_MAC, PEER_MAC, RELAY_CLIENT_SIDE_MAC, RELAY_PEER_SIDE_MAC,
    },
    packet::{
        add_fingerprint, channel_data, data_indication, send_indication, stun_attribute,
        stun_message, xor_peer_address, UdpFrame, DATA, DONT_FRAGMENT, SEND_INDICATION, SOFTWARE,
    },
    require_root,
};

#[path = "xdp_fixtures/fuzz.rs"]
mod fuzz;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// A host on the client-side link that the relay's XDP_TX case sends to.
const NEAR_PEER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x01, 0x03];

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address literal")
}

/// What a fixture expects.
enum Expect {
    /// Forwarded out of another interface (redirect) or the same one (XDP_TX), as this frame.
    Forward {
        frame: Vec<u8>,
        same_interface: bool,
        reason: Reason,
    },
    /// Passed to the stack unchanged.
    Pass(Reason),
    /// Forwarded out of another interface as a Data indication (reason ForwardDataToClient)
    /// in `template`'s addressing, carrying `data` from `peer`. The kernel picks the
    /// transaction id: the expected frame is built around the one in the output, so every
    /// other byte, the XOR-PEER-ADDRESS (its IPv6 form depends on the id) and the UDP checksum
    /// (recomputed in full) are checked exactly.
    DataIndication {
        template: UdpFrame,
        peer: SocketAddr,
        data: Vec<u8>,
    },
}

struct Fixture {
    name: String,
    input: Vec<u8>,
    from_peer_side: bool,
    expect: Expect,
    /// The change of one allocation's counters (counter slot; to-peer packets and bytes,
    /// to-client packets and bytes), when the fixture checks one.
    counts: Option<(u32, [u64; 4])>,
}

/// The addressing of one family's binding.
struct Family {
    client: SocketAddr,
    listener: SocketAddr,
    relayed: SocketAddr,
    peer: SocketAddr,
}

const V4: fn() -> Family = || Family {
    client: addr("198.18.1.2:40000"),
    listener: addr("198.18.1.1:3478"),
    relayed: addr("198.18.2.1:50000"),
    peer: addr("198.18.2.2:9000"),
};

const V6: fn() -> Family = || Family {
    client: addr("[2001:2:0:1::2]:40000"),
    listener: addr("[2001:2:0:1::1]:3478"),
    relayed: addr("[2001:2:0:2::1]:50000"),
    peer: addr("[2001:2:0:2::2]:9000"),
};

const CHANNEL_V4: u16 = 0x4001;

/// An IPv4 client whose allocation relays over IPv6, and an IPv6 client relaying over IPv4.
const XLAT_V4_CLIENT: fn() -> Family = || Family {
    client: addr("198.18.1.2:40020"),
    listener: addr("198.18.1.1:3478"),
    relayed: addr("[2001:2:0:2::1]:50020"),
    peer: addr("[2001:2:0:2::2]:9020"),
};
/// Permissions across families (no channel): an IPv4 client relaying over IPv6, the reverse,
/// and a dual allocation (both relayed families) of an IPv4 client, by its two peers.
const XLAT_V4_SEND_ID: u16 = 22;
const XLAT_V4_SEND: fn() -> Family = || Family {
    client: addr("198.18.1.2:40022"),
    listener: addr("198.18.1.1:3478"),
    relayed: addr("[2001:2:0:2::1]:50022"),
    peer: addr("[2001:2:0:2::2]:9022"),
};
const XLAT_V6_SEND_ID: u16 = 23;
const XLAT_V6_SEND: fn() -> Family = || Family {
    client: addr("[2001:2:0:1::2]:40023"),
    listener: addr("[2001:2:0:1::1]:3478"),
    relayed: addr("198.18.2.1:50023"),
    peer: addr("198.18.2.2:9023"),
};
const DUAL_ID: u16 = 24;
const DUAL_V4: fn() -> Family = || Family {
    client: addr("198.18.1.2:40024"),
    listener: addr("198.18.1.1:3478"),
    relayed: addr("198.18.2.1:50024"),
    peer: addr("198.18.2.2:9024"),
};
const DUAL_V6: fn() -> Family = || Family {
    relayed: addr("[2001:2:0:2::1]:50024"),
    peer: addr("[2001:2:0:2::2]:9024"),
    ..DUAL_V4()
};
const XLAT_V6_CLIENT: fn() -> Family = || Family {
    client: addr("[2001:2:0:1::2]:40021"),
    listener: addr("[2001:2:0:1::1]:3478"),
    relayed: addr("198.18.2.1:50021"),
    peer: addr("198.18.2.2:9021"),
};
/// A peer behind a route with MTU 100 (20 B IPv4 + 8 B UDP + 72 B of data fit).
const SMALL_MTU_PEER: &str = "198.18.2.50:9000";
/// A peer address the fixtures' policy denies (`--deny-peer`), on the peer-side link.
const DENIED_PEER: &str = "198.18.2.66:9000";
const CHANNEL_V6: u16 = 0x4002;

fn client_frame(f: &Family, payload: &[u8]) -> UdpFrame {
    UdpFrame::new(
        CLIENT_MAC,
        RELAY_CLIENT_SIDE_MAC,
        f.client,
        f.listener,
        payload,
    )
}

fn peer_frame(f: &Family, payload: &[u8]) -> UdpFrame {
    UdpFrame::new(PEER_MAC, RELAY_PEER_SIDE_MAC, f.peer, f.relayed, payload)
}

/// The IP header fields of everything the kernel path sends (as the socket path's sockets
/// send): TTL 64, DSCP/ECN 0, IPv4 DF with id 0.
fn relay_sent(mut frame: UdpFrame) -> UdpFrame {
    frame.ttl = 64;
    frame.ip_id = 0;
    frame.tos = 0;
    frame
}

/// What the peer should receive for `data`: from the relayed address.
fn to_peer_frame(f: &Family, data: &[u8]) -> UdpFrame {
    relay_sent(UdpFrame::new(
        RELAY_PEER_SIDE_MAC,
        PEER_MAC,
        f.relayed,
        f.peer,
        data,
    ))
}

/// What the client should receive for a peer's `data` on `channel`.
fn to_client_frame(f: &Family, channel: u16, data: &[u8]) -> UdpFrame {
    relay_sent(UdpFrame::new(
        RELAY_CLIENT_SIDE_MAC,
        CLIENT_MAC,
        f.listener,
        f.client,
        &channel_data(channel, data, 0),
    ))
}

fn forward(frame: UdpFrame, reason: Reason) -> Expect {
    Expect::Forward {
        frame: frame.build(),
        same_interface: false,
        reason,
    }
}

fn fixtures() -> Vec<Fixture> {
    let v4 = V4();
    let v6 = V6();
    let mut list = Vec::new();
    let mut add = |name: &str, input: Vec<u8>, from_peer_side, expect| {
        list.push(Fixture {
            name: name.to_string(),
            input,
            from_peer_side,
            expect,
            counts: None,
        })
    };

    // Client → peer, both families, 0 / 1 / 3 padding bytes (odd data lengths exercise the
    // byte-wise checksum removal; non-zero padding bytes must be accounted for too).
    for (family, channel, tag) in [(&v4, CHANNEL_V4, "v4"), (&v6, CHANNEL_V6, "v6")] {
        let exact = b"twelve bytes";
        add(
            if tag == "v4" {
                "client->peer v4, no padding"
            } else {
                "client->peer v6, no padding"
            },
            client_frame(family, &channel_data(channel, exact, 0)).build(),
            false,
            forward(to_peer_frame(family, exact), Reason::ForwardToPeer),
        );
        let nine = b"nine byte";
        let mut padded = channel_data(channel, nine, 3);
        padded[13..16].copy_from_slice(&[0xab, 0xcd, 0xef]);
        add(
            if tag == "v4" {
                "client->peer v4, 3 padding bytes"
            } else {
                "client->peer v6, 3 padding bytes"
            },
            client_frame(family, &padded).build(),
            false,
            forward(to_peer_frame(family, nine), Reason::ForwardToPeer),
        );
        let eleven = b"eleven byte";
        let mut one = channel_data(channel, eleven, 1);
        one[15] = 0x5a;
        add(
            if tag == "v4" {
                "client->peer v4, 1 padding byte"
            } else {
                "client->peer v6, 1 padding byte"
            },
            client_frame(family, &one).build(),
            false,
            forward(to_peer_frame(family, eleven), Reason::ForwardToPeer),
        );
        let reply = b"odd reply";
        add(
            if tag == "v4" {
                "peer->client v4"
            } else {
                "peer->client v6"
            },
            peer_frame(family, reply).build(),
            true,
            forward(
                to_client_frame(family, channel, reply),
                Reason::ForwardToClient,
            ),
        );
        let empty: &[u8] = b"";
        add(
            if tag == "v4" {
                "peer->client v4, empty datagram"
            } else {
                "peer->client v6, empty datagram"
            },
            peer_frame(family, empty).build(),
            true,
            forward(
                to_client_frame(family, channel, empty),
                Reason::ForwardToClient,
            ),
        );
    }

    // Checksum corner cases: an IPv4 datagram without UDP checksum stays without one; TOS and
    // IP id are the relay's (0), as from its sockets; IPv6 with a zero checksum goes to the
    // stack.
    let data = b"no checksum";
    let mut input = client_frame(&v4, &channel_data(CHANNEL_V4, data, 1));
    input.zero_checksum = true;
    input.tos = 0xb8;
    input.ip_id = 0xfffe;
    let mut output = to_peer_frame(&v4, data);
    output.zero_checksum = true;
    add(
        "client->peer v4, UDP checksum 0 stays 0",
        input.build(),
        false,
        forward(output, Reason::ForwardToPeer),
    );
    let mut input = peer_frame(&v4, b"zero");
    input.zero_checksum = true;
    let mut output = to_client_frame(&v4, CHANNEL_V4, b"zero");
    output.zero_checksum = true;
    add(
        "peer->client v4, UDP checksum 0 stays 0",
        input.build(),
        true,
        forward(output, Reason::ForwardToClient),
    );
    let mut input = client_frame(&v6, &channel_data(CHANNEL_V6, b"x", 3));
    input.zero_checksum = true;
    add(
        "client->peer v6, UDP checksum 0",
        input.build(),
        false,
        Expect::Pass(Reason::PassIpv6ZeroChecksum),
    );

    // Same interface: a peer on the client-side link leaves through XDP_TX.
    let near = Family {
        client: addr("198.18.1.2:40004"),
        listener: v4.listener,
        relayed: addr("198.18.1.1:50004"),
        peer: addr("198.18.1.3:9000"),
    };
    let output = relay_sent(UdpFrame::new(
        RELAY_CLIENT_SIDE_MAC,
        NEAR_PEER_MAC,
        near.relayed,
        near.peer,
        b"one nic",
    ));
    add(
        "client->peer v4, egress = ingress",
        client_frame(&near, &channel_data(0x4004, b"one nic", 1)).build(),
        false,
        Expect::Forward {
            frame: output.build(),
            same_interface: true,
            reason: Reason::ForwardToPeer,
        },
    );

    // Client-to-client through the relay: allocation 5's peer is allocation 6's relayed
    // address and the other way round; ChannelData goes from client 5 straight to client 6 on
    // 6's channel, unpadded, and leaves where it came in.
    let a = Family {
        client: addr("198.18.1.2:40005"),
        listener: v4.listener,
        relayed: addr("198.18.2.1:50005"),
        peer: addr("198.18.2.1:50006"),
    };
    let b = Family {
        client: addr("198.18.1.2:40006"),
        listener: v4.listener,
        relayed: addr("198.18.2.1:50006"),
        peer: addr("198.18.2.1:50005"),
    };
    for (name, padding) in [("hairpin v4", 0), ("hairpin v4, 2 padding bytes", 2)] {
        add(
            name,
            client_frame(&a, &channel_data(0x4005, b"to client b", padding)).build(),
            false,
            Expect::Forward {
                frame: to_client_frame(&b, 0x4006, b"to client b").build(),
                same_interface: true,
                reason: Reason::ForwardHairpin,
            },
        );
    }
    // Client-to-client between families: allocation 25's client is on IPv6, 26's on IPv4,
    // both relayed addresses IPv4; each client gets the other's data in its own family.
    let v6_client = Family {
        client: addr("[2001:2:0:1::2]:40025"),
        listener: V6().listener,
        relayed: addr("198.18.2.1:50025"),
        peer: addr("198.18.2.1:50026"),
    };
    let v4_client = Family {
        client: addr("198.18.1.2:40026"),
        listener: v4.listener,
        relayed: addr("198.18.2.1:50026"),
        peer: addr("198.18.2.1:50025"),
    };
    for (name, from, to, channel, back) in [
        (
            "hairpin v6 client -> v4 client",
            &v6_client,
            &v4_client,
            0x4025,
            0x4026,
        ),
        (
            "hairpin v4 client -> v6 client",
            &v4_client,
            &v6_client,
            0x4026,
            0x4025,
        ),
    ] {
        add(
            name,
            client_frame(from, &channel_data(channel, b"across", 2)).build(),
            false,
            Expect::Forward {
                frame: to_client_frame(to, back, b"across").build(),
                same_interface: true,
                reason: Reason::ForwardHairpin,
            },
        );
    }
    let lonely = Family {
        client: addr("198.18.1.2:40007"),
        listener: v4.listener,
        relayed: addr("198.18.2.1:50007"),
        peer: addr("198.18.2.1:50099"),
    };
    add(
        "hairpin to an allocation without a channel back",
        client_frame(&lonely, &channel_data(0x4007, b"data indication", 0)).build(),
        false,
        Expect::Pass(Reason::PassHairpinNoChannel),
    );
    // From the wire, a relayed address as source is spoofed (the stack drops it as martian):
    // the hairpin entry never forwards it.
    add(
        "spoofed relayed source from the wire",
        UdpFrame::new(
            PEER_MAC,
            RELAY_PEER_SIDE_MAC,
            a.relayed,
            b.relayed,
            b"spoof",
        )
        .build(),
        true,
        Expect::Pass(Reason::PassUdpNoMatch),
    );
    // Defence in depth: an entry whose peer the policy denies is never used.
    let denied = Family {
        client: addr("198.18.1.2:40008"),
        listener: v4.listener,
        relayed: addr("198.18.2.1:50008"),
        peer: addr(DENIED_PEER),
    };
    add(
        "entry towards a denied peer",
        client_frame(&denied, &channel_data(0x4008, b"nope", 0)).build(),
        false,
        Expect::Pass(Reason::PassPolicyDenied),
    );

    // A datagram that would not fit the egress MTU (a 100-byte route to this peer) goes to
    // the socket path, which fragments it as the stack does; one that fits is forwarded.
    let small_mtu = Family {
        client: addr("198.18.1.2:40009"),
        listener: v4.listener,
        relayed: addr("198.18.2.1:50009"),
        peer: addr(SMALL_MTU_PEER),
    };
    add(
        "client->peer over the egress MTU",
        client_frame(&small_mtu, &channel_data(0x4009, &[7u8; 80], 0)).build(),
        false,
        Expect::Pass(Reason::PassFragNeeded),
    );
    add(
        "client->peer at the egress MTU",
        client_frame(&small_mtu, &channel_data(0x4009, &[7u8; 72], 0)).build(),
        false,
        Expect::Forward {
            frame: relay_sent(UdpFrame::new(
                RELAY_PEER_SIDE_MAC,
                PEER_MAC,
                small_mtu.relayed,
                small_mtu.peer,
                &[7u8; 72],
            ))
            .build(),
            same_interface: false,
            reason: Reason::ForwardToPeer,
        },
    );

    // IPv4 ↔ IPv6 (RFC 8656 §7.2): a client of one family, a relayed address and peer of the
    // other; the program rewrites the IP header into the other family, both ways.
    for (translated, channel) in [(XLAT_V4_CLIENT(), 0x4020), (XLAT_V6_CLIENT(), 0x4021)] {
        for data in [&b"across families"[..], b"odd!!", b""] {
            add(
                "client->peer across families",
                client_frame(
                    &translated,
                    &channel_data(channel, data, 3 - data.len() % 4),
                )
                .build(),
                false,
                forward(to_peer_frame(&translated, data), Reason::ForwardToPeer),
            );
            add(
                "peer->client across families",
                peer_frame(&translated, data).build(),
                true,
                forward(
                    to_client_frame(&translated, channel, data),
                    Reason::ForwardToClient,
                ),
            );
        }
    }
    // An IPv4 datagram without a UDP checksum cannot become IPv6 (RFC 8200 §8.1).
    let mut input = client_frame(&XLAT_V4_CLIENT(), &channel_data(0x4020, b"nock", 0));
    input.zero_checksum = true;
    add(
        "client->peer v4 -> v6, UDP checksum 0",
        input.build(),
        false,
        Expect::Pass(Reason::PassIpv6ZeroChecksum),
    );

    // Everything the socket path handles.
    add(
        "ChannelData on an unbound channel",
        client_frame(&v4, &channel_data(0x4fff, b"who", 1)).build(),
        false,
        Expect::Pass(Reason::PassNoBinding),
    );
    let expired = Family {
        client: addr("198.18.1.2:40003"),
        ..V4()
    };
    add(
        "expired binding",
        client_frame(&expired, &channel_data(0x4003, b"late", 0)).build(),
        false,
        Expect::Pass(Reason::PassExpired),
    );
    let mut bad_length = channel_data(CHANNEL_V4, b"short", 3);
    bad_length[3] = 20;
    add(
        "ChannelData length beyond the datagram",
        client_frame(&v4, &bad_length).build(),
        false,
        Expect::Pass(Reason::PassBadChannelLength),
    );
    add(
        "ChannelData followed by 4 bytes",
        client_frame(&v4, &channel_data(CHANNEL_V4, b"four", 4)).build(),
        false,
        Expect::Pass(Reason::PassBadChannelLength),
    );
    let mut fragment = client_frame(&v4, &channel_data(CHANNEL_V4, b"frag", 0)).build();
    fragment[20] |= 0x20; // more fragments
    add(
        "IPv4 first fragment",
        fragment,
        false,
        Expect::Pass(Reason::PassFragment),
    );
    let mut options = client_frame(&v4, &channel_data(CHANNEL_V4, b"opts", 0)).build();
    options[14] = 0x46;
    add(
        "IPv4 header with options",
        options,
        false,
        Expect::Pass(Reason::PassIpOptions),
    );
    let mut tcp = client_frame(&v4, &channel_data(CHANNEL_V4, b"tcp!", 0)).build();
    tcp[23] = 6;
    add("not UDP", tcp, false, Expect::Pass(Reason::PassNotUdp));
    let mut v6_fragment = client_frame(&v6, &channel_data(CHANNEL_V6, b"frag", 0)).build();
    v6_fragment[20] = 44; // next header: fragment
    add(
        "IPv6 fragment header",
        v6_fragment,
        false,
        Expect::Pass(Reason::PassFragment),
    );
    add(
        "STUN to the listener",
        client_frame(&v4, &[0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42]).build(),
        false,
        Expect::Pass(Reason::PassUdpNoMatch),
    );
    let stranger = Family {
        peer: addr("198.18.2.2:9999"),
        ..V4()
    };
    add(
        "peer without a channel",
        peer_frame(&stranger, b"data indication please").build(),
        true,
        Expect::Pass(Reason::PassUdpNoMatch),
    );
    list.extend(indication_fixtures());
    list
}

/// The permission fixtures' allocations: 10 / 11 (IPv4 / IPv6) have permissions only, 12 / 13
/// a channel to the peer's port [`CHANNEL_PEER_PORT`] as well, 14 / 15 an expired permission.
const PERMISSION_ONLY: u16 = 10;
const WITH_CHANNEL: u16 = 12;
const EXPIRED: u16 = 14;
const CHANNEL_PEER_PORT: u16 = 9100;
/// A peer IP without a permission (on the peer-side link).
const NO_PERMISSION_V4: &str = "198.18.2.3";
const NO_PERMISSION_V6: &str = "2001:2:0:2::3";

/// The addressing of allocation `base + v6`: its own client port and relayed port, the lab's
/// peer IP (port 9000).
fn indication_family(v6: bool, base: u16) -> Family {
    let allocation = base + u16::from(v6);
    let (client, listener, relayed, peer) = if v6 {
        (
            "[2001:2:0:1::2]",
            "[2001:2:0:1::1]",
            "[2001:2:0:2::1]",
            "[2001:2:0:2::2]",
        )
    } else {
        ("198.18.1.2", "198.18.1.1", "198.18.2.1", "198.18.2.2")
    };
    Family {
        client: addr(&format!("{client}:{}", 40000 + allocation)),
        listener: addr(&format!("{listener}:3478")),
        relayed: addr(&format!("{relayed}:{}", 50000 + allocation)),
        peer: addr(&format!("{peer}:9000")),
    }
}

/// `f` with another peer address.
fn with_peer(f: &Family, peer: SocketAddr) -> Family {
    Family { peer, ..*f }
}

/// `f`'s peer IP with another port.
fn peer_port(f: &Family, port: u16) -> SocketAddr {
    SocketAddr::new(f.peer.ip(), port)
}

/// A transaction id of varied bytes.
fn tid(seed: u8) -> [u8; 12] {
    std::array::from_fn(|i| seed.wrapping_mul(31).wrapping_add(17 * i as u8 + 1))
}

/// `len` bytes of application data.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// A SOFTWARE attribute (comprehension-optional) with a 13-byte value whose three padding
/// bytes are not zero (receivers ignore padding, RFC 8489 §14): they must still leave the
/// checksum correctly.
fn software() -> Vec<u8> {
    let mut attribute = stun_attribute(SOFTWARE, b"relay fixture");
    attribute[17..].copy_from_slice(&[0xa5, 0x5a, 0xff]);
    attribute
}

/// The client-side frame the kernel should send for a Data indication on `f`.
fn data_indication_template(f: &Family) -> UdpFrame {
    relay_sent(UdpFrame::new(
        RELAY_CLIENT_SIDE_MAC,
        CLIENT_MAC,
        f.listener,
        f.client,
        &[],
    ))
}

fn data_indication_expect(f: &Family, data: &[u8]) -> Expect {
    Expect::DataIndication {
        template: data_indication_template(f),
        peer: f.peer,
        data: data.to_vec(),
    }
}

fn to_peer_counts(slot: u16, bytes: usize) -> Option<(u32, [u64; 4])> {
    Some((u32::from(slot), [1, bytes as u64, 0, 0]))
}

fn to_client_counts(slot: u16, bytes: usize) -> Option<(u32, [u64; 4])> {
    Some((u32::from(slot), [0, 0, 1, bytes as u64]))
}

fn nothing_counted(slot: u16) -> Option<(u32, [u64; 4])> {
    Some((u32::from(slot), [0; 4]))
}

/// Send and Data indications (RFC 8656 §11), both families.
fn indication_fixtures() -> Vec<Fixture> {
    let mut list = Vec::new();
    let mut add = |name: String, input: Vec<u8>, from_peer_side, expect, counts| {
        list.push(Fixture {
            name,
            input,
            from_peer_side,
            expect,
            counts,
        })
    };
    for v6 in [false, true] {
        let tag = if v6 { "v6" } else { "v4" };
        let f = indication_family(v6, PERMISSION_ONLY);
        let slot = PERMISSION_ONLY + u16::from(v6);
        let send_forward =
            |f: &Family, data: &[u8]| forward(to_peer_frame(f, data), Reason::ForwardSendToPeer);

        // Send indications: DATA's value leaves, STUN framing and padding do not.
        for (seed, len) in [(1u8, 1usize), (2, 3), (3, 5), (4, 13), (5, 12), (6, 0)] {
            let data = payload(len);
            add(
                format!("{tag} send indication, {len} data bytes"),
                client_frame(&f, &send_indication(tid(seed), f.peer, &data, &[])).build(),
                false,
                send_forward(&f, &data),
                to_peer_counts(slot, len),
            );
        }
        let data = payload(13);
        let mut message = send_indication(tid(7), f.peer, &data, &[]);
        let end = message.len();
        message[end - 3..].copy_from_slice(&[0xab, 0xcd, 0xef]);
        add(
            format!("{tag} send indication, non-zero DATA padding"),
            client_frame(&f, &message).build(),
            false,
            send_forward(&f, &data),
            to_peer_counts(slot, 13),
        );
        // Every port bit flips under the XOR: a port above 0x8000 and one with the cookie's
        // own bits.
        for port in [61000, 0x2112] {
            let other = with_peer(&f, peer_port(&f, port));
            add(
                format!("{tag} send indication to peer port {port}"),
                client_frame(&f, &send_indication(tid(8), other.peer, b"port", &[])).build(),
                false,
                send_forward(&other, b"port"),
                to_peer_counts(slot, 4),
            );
        }
        let data = payload(5);
        let before = stun_message(
            SEND_INDICATION,
            tid(9),
            &[
                xor_peer_address(tid(9), f.peer),
                software(),
                stun_attribute(DATA, &data),
            ],
        );
        add(
            format!("{tag} send indication, SOFTWARE before DATA"),
            client_frame(&f, &before).build(),
            false,
            send_forward(&f, &data),
            to_peer_counts(slot, 5),
        );
        add(
            format!("{tag} send indication, SOFTWARE after DATA"),
            client_frame(&f, &send_indication(tid(10), f.peer, &data, &[software()])).build(),
            false,
            send_forward(&f, &data),
            to_peer_counts(slot, 5),
        );
        let data = payload(3);
        let both = stun_message(
            SEND_INDICATION,
            tid(11),
            &[
                software(),
                xor_peer_address(tid(11), f.peer),
                stun_attribute(DATA, &data),
                software(),
            ],
        );
        add(
            format!("{tag} send indication, SOFTWARE first and last"),
            client_frame(&f, &both).build(),
            false,
            send_forward(&f, &data),
            to_peer_counts(slot, 3),
        );

        // Data indications: from the listener to the client, XOR-PEER-ADDRESS and DATA.
        for len in [1usize, 3, 5, 13, 12, 0] {
            let data = payload(len);
            add(
                format!("{tag} data indication, {len} data bytes"),
                peer_frame(&f, &data).build(),
                true,
                data_indication_expect(&f, &data),
                to_client_counts(slot, len),
            );
        }
        // Permissions are per peer IP: any port of the peer is let in.
        for port in [61000, 0x2112] {
            let other = with_peer(&f, peer_port(&f, port));
            add(
                format!("{tag} data indication from peer port {port}"),
                peer_frame(&other, b"other port").build(),
                true,
                data_indication_expect(&other, b"other port"),
                to_client_counts(slot, 10),
            );
        }
        // The largest datagram whose Data indication fits the client link's 1500-byte MTU,
        // and one byte more (its DATA is padded past the MTU).
        let framing = if v6 { 40 + 8 + 48 } else { 20 + 8 + 36 };
        let largest = 1500 - framing;
        let data = payload(largest);
        add(
            format!("{tag} data indication at the client MTU"),
            peer_frame(&f, &data).build(),
            true,
            data_indication_expect(&f, &data),
            to_client_counts(slot, largest),
        );
        add(
            format!("{tag} data indication over the client MTU"),
            peer_frame(&f, &payload(largest + 1)).build(),
            true,
            Expect::Pass(Reason::PassFragNeeded),
            nothing_counted(slot),
        );

        // A channel and a permission for the same peer IP: the channel's port gets
        // ChannelData, the peer's other ports Data indications; the client sends either way.
        let c = indication_family(v6, WITH_CHANNEL);
        let c_slot = WITH_CHANNEL + u16::from(v6);
        let channel = 0x4000 + c_slot;
        let bound = with_peer(&c, peer_port(&c, CHANNEL_PEER_PORT));
        add(
            format!("{tag} channel and permission: peer on the channel"),
            peer_frame(&bound, b"channel wins").build(),
            true,
            forward(
                to_client_frame(&bound, channel, b"channel wins"),
                Reason::ForwardToClient,
            ),
            to_client_counts(c_slot, 12),
        );
        add(
            format!("{tag} channel and permission: peer's other port"),
            peer_frame(&c, b"indication").build(),
            true,
            data_indication_expect(&c, b"indication"),
            to_client_counts(c_slot, 10),
        );
        add(
            format!("{tag} channel and permission: send indication"),
            client_frame(&c, &send_indication(tid(12), c.peer, b"send", &[])).build(),
            false,
            send_forward(&c, b"send"),
            to_peer_counts(c_slot, 4),
        );
        // What coturn's uclient sends: DATA first, then XOR-PEER-ADDRESS, then FINGERPRINT.
        let long: Vec<u8> = (0..200u8).collect();
        add(
            format!("{tag} send indication in uclient's order with 200 bytes"),
            client_frame(&c, &{
                let mut message = stun_message(
                    0x0016,
                    tid(30),
                    &[
                        stun_attribute(0x0013, &long),
                        xor_peer_address(tid(30), c.peer),
                    ],
                );
                add_fingerprint(&mut message);
                message
            })
            .build(),
            false,
            send_forward(&c, &long),
            to_peer_counts(c_slot, 200),
        );
        // A valid FINGERPRINT is checked in the kernel and leaves with the STUN framing.
        add(
            format!("{tag} send indication with a valid FINGERPRINT"),
            client_frame(&c, &{
                let mut message = send_indication(tid(22), c.peer, b"fp", &[]);
                add_fingerprint(&mut message);
                message
            })
            .build(),
            false,
            send_forward(&c, b"fp"),
            to_peer_counts(c_slot, 2),
        );
        add(
            format!("{tag} channel and permission: ChannelData"),
            client_frame(&bound, &channel_data(channel, b"channel", 1)).build(),
            false,
            forward(to_peer_frame(&bound, b"channel"), Reason::ForwardToPeer),
            to_peer_counts(c_slot, 7),
        );

        // Everything the socket path handles.
        let stranger = addr(&if v6 {
            format!("[{NO_PERMISSION_V6}]:9000")
        } else {
            format!("{NO_PERMISSION_V4}:9000")
        });
        let mut pass = |name: &str, input: Vec<u8>, from_peer_side, reason| {
            add(
                format!("{tag} {name}"),
                input,
                from_peer_side,
                Expect::Pass(reason),
                nothing_counted(slot),
            );
        };
        pass(
            "send indication to a peer IP without a permission",
            client_frame(&f, &send_indication(tid(20), stranger, b"no", &[])).build(),
            false,
            Reason::PassNoPermission,
        );
        pass(
            "datagram from a peer IP without a permission",
            peer_frame(&with_peer(&f, stranger), b"no").build(),
            true,
            Reason::PassUdpNoMatch,
        );
        let unsupported = [
            (
                "send indication with DONT-FRAGMENT",
                send_indication(
                    tid(21),
                    f.peer,
                    b"df",
                    &[stun_attribute(DONT_FRAGMENT, &[])],
                ),
            ),
            // A wrong FINGERPRINT: no STUN message (RFC 8489 §7.3), the socket path's.
            ("send indication with a wrong FINGERPRINT", {
                let mut message = send_indication(tid(22), f.peer, b"fp", &[]);
                add_fingerprint(&mut message);
                let last = message.len() - 1;
                message[last] ^= 1;
                message
            }),
            (
                "send indication with an unknown comprehension-required attribute",
                send_indication(tid(23), f.peer, b"cr", &[stun_attribute(0x0031, b"x")]),
            ),
            (
                "send indication with two XOR-PEER-ADDRESS",
                send_indication(
                    tid(24),
                    f.peer,
                    b"two",
                    &[xor_peer_address(tid(24), f.peer)],
                ),
            ),
            (
                "send indication with two DATA",
                send_indication(tid(25), f.peer, b"two", &[stun_attribute(DATA, b"more")]),
            ),
            ("send indication longer than its datagram", {
                let mut message = send_indication(tid(26), f.peer, b"long", &[]);
                message[3] += 4;
                message
            }),
            ("send indication shorter than its datagram", {
                let mut message = send_indication(tid(27), f.peer, b"short", &[]);
                message.extend_from_slice(&stun_attribute(SOFTWARE, b""));
                message
            }),
            ("send indication length not a multiple of 4", {
                let mut message = send_indication(tid(28), f.peer, b"odd", &[]);
                message.pop();
                message[3] -= 1;
                message
            }),
            (
                "send indication to peer port 0",
                send_indication(tid(30), peer_port(&f, 0), b"zero", &[]),
            ),
            ("send indication with a wrong magic cookie", {
                let mut message = send_indication(tid(31), f.peer, b"cookie", &[]);
                message[4] ^= 1;
                message
            }),
            (
                "send indication without DATA",
                stun_message(
                    SEND_INDICATION,
                    tid(32),
                    &[xor_peer_address(tid(32), f.peer)],
                ),
            ),
            (
                "send indication without XOR-PEER-ADDRESS",
                stun_message(SEND_INDICATION, tid(33), &[stun_attribute(DATA, b"where")]),
            ),
            (
                "send indication with an attribute length whose padding wraps 16 bits",
                {
                    // SOFTWARE claiming 0xfffd bytes: padded in 16 bits it would be 0 and the
                    // attribute skipped; it runs past the message instead.
                    let mut message = send_indication(tid(39), f.peer, b"wrap", &[software()]);
                    let at = message.len() - software().len();
                    message[at + 2..at + 4].copy_from_slice(&0xfffdu16.to_be_bytes());
                    message
                },
            ),
            (
                "send indication with seven attributes",
                send_indication(tid(34), f.peer, b"many", &vec![software(); 5]),
            ),
            (
                "send indication with 64 bytes of attributes before DATA",
                stun_message(
                    SEND_INDICATION,
                    tid(35),
                    &[
                        xor_peer_address(tid(35), f.peer),
                        stun_attribute(SOFTWARE, &[b's'; 60]),
                        stun_attribute(DATA, b"far"),
                    ],
                ),
            ),
            (
                "send indication with 36 bytes after DATA's value",
                send_indication(
                    tid(36),
                    f.peer,
                    b"tail",
                    &[stun_attribute(SOFTWARE, &[b't'; 32])],
                ),
            ),
        ];
        for (name, message) in unsupported {
            pass(
                name,
                client_frame(&f, &message).build(),
                false,
                Reason::PassStunUnsupported,
            );
        }
        // A peer of the other family: this allocation has no relayed address of that family
        // (RFC 8656 §11.2 drops it; the socket path decides).
        let other_family = if v6 {
            addr("198.18.2.2:9000")
        } else {
            addr("[2001:2:0:2::2]:9000")
        };
        pass(
            "send indication to a peer of the other family",
            client_frame(&f, &send_indication(tid(29), other_family, b"family", &[])).build(),
            false,
            Reason::PassNoPermission,
        );
        let nobody = Family {
            client: SocketAddr::new(f.client.ip(), 40099),
            ..with_peer(&f, f.peer)
        };
        pass(
            "send indication from a client without an allocation",
            client_frame(&nobody, &send_indication(tid(37), f.peer, b"who", &[])).build(),
            false,
            Reason::PassNoBinding,
        );
        let expired = indication_family(v6, EXPIRED);
        let e_slot = EXPIRED + u16::from(v6);
        add(
            format!("{tag} send indication, expired permission"),
            client_frame(
                &expired,
                &send_indication(tid(38), expired.peer, b"late", &[]),
            )
            .build(),
            false,
            Expect::Pass(Reason::PassExpired),
            nothing_counted(e_slot),
        );
        add(
            format!("{tag} datagram to an expired permission"),
            peer_frame(&expired, b"late").build(),
            true,
            Expect::Pass(Reason::PassExpired),
            nothing_counted(e_slot),
        );
    }

    // IPv4 only: the peer policy and the egress MTU apply to Send indications as to
    // ChannelData.
    let f = indication_family(false, PERMISSION_ONLY);
    let denied = with_peer(&f, addr(DENIED_PEER));
    add(
        "v4 send indication to a denied peer".to_string(),
        client_frame(&f, &send_indication(tid(40), denied.peer, b"nope", &[])).build(),
        false,
        Expect::Pass(Reason::PassPolicyDenied),
        nothing_counted(PERMISSION_ONLY),
    );
    let small = with_peer(&f, addr(SMALL_MTU_PEER));
    add(
        "v4 send indication at the egress MTU".to_string(),
        client_frame(&f, &send_indication(tid(41), small.peer, &[7u8; 72], &[])).build(),
        false,
        forward(to_peer_frame(&small, &[7u8; 72]), Reason::ForwardSendToPeer),
        to_peer_counts(PERMISSION_ONLY, 72),
    );
    add(
        "v4 send indication over the egress MTU".to_string(),
        client_frame(&f, &send_indication(tid(42), small.peer, &[7u8; 73], &[])).build(),
        false,
        Expect::Pass(Reason::PassFragNeeded),
        nothing_counted(PERMISSION_ONLY),
    );
    // IPv4 ↔ IPv6 (RFC 8656 §7.2): a client of one family whose relayed address is of the
    // other; Send leaves and Data arrives in the peer's family, translated both ways.
    for (f, slot) in [
        (XLAT_V4_SEND(), XLAT_V4_SEND_ID),
        (XLAT_V6_SEND(), XLAT_V6_SEND_ID),
    ] {
        let tag = if f.client.is_ipv4() {
            "v4->v6"
        } else {
            "v6->v4"
        };
        for (seed, len) in [(50u8, 1usize), (51, 13), (52, 0)] {
            let data = payload(len);
            add(
                format!("{tag} send indication across families, {len} data bytes"),
                client_frame(
                    &f,
                    &send_indication(tid(seed), f.peer, &data, &[software()]),
                )
                .build(),
                false,
                forward(to_peer_frame(&f, &data), Reason::ForwardSendToPeer),
                to_peer_counts(slot, len),
            );
            add(
                format!("{tag} data indication across families, {len} data bytes"),
                peer_frame(&f, &data).build(),
                true,
                data_indication_expect(&f, &data),
                to_client_counts(slot, len),
            );
        }
    }
    // A dual allocation (ADDITIONAL-ADDRESS-FAMILY): one IPv4 client, a relayed address of
    // each family; each Send leaves from the one of its peer's family.
    for (f, seed) in [(DUAL_V4(), 53u8), (DUAL_V6(), 54)] {
        let tag = if f.peer.is_ipv4() { "v4" } else { "v6" };
        add(
            format!("dual allocation: send indication to a {tag} peer"),
            client_frame(&f, &send_indication(tid(seed), f.peer, b"dual", &[])).build(),
            false,
            forward(to_peer_frame(&f, b"dual"), Reason::ForwardSendToPeer),
            to_peer_counts(DUAL_ID, 4),
        );
        add(
            format!("dual allocation: data indication from a {tag} peer"),
            peer_frame(&f, b"dual back").build(),
            true,
            data_indication_expect(&f, b"dual back"),
            to_client_counts(DUAL_ID, 9),
        );
    }

    // An IPv4 datagram without UDP checksum gets a Data indication without one.
    let mut input = peer_frame(&f, b"no checksum");
    input.zero_checksum = true;
    let mut template = data_indication_template(&f);
    template.zero_checksum = true;
    add(
        "v4 data indication, UDP checksum 0 stays 0".to_string(),
        input.build(),
        true,
        Expect::DataIndication {
            template,
            peer: f.peer,
            data: b"no checksum".to_vec(),
        },
        to_client_counts(PERMISSION_ONLY, 11),
    );
    list
}

/// The permissions of [`indication_fixtures`], and the channels of allocations 12 and 13.
fn permissions() -> (Vec<PermissionBinding>, Vec<ChannelBinding>) {
    let in_a_minute = Instant::now() + Duration::from_secs(60);
    let past = Instant::now()
        .checked_sub(Duration::from_secs(1))
        .expect("the clock is past boot + 1 s");
    let permission = |f: &Family, allocation: u16, peer_ip, expires_at| PermissionBinding {
        allocation: u64::from(allocation),
        client: f.client,
        listener: f.listener,
        relayed: f.relayed,
        peer_ip,
        expires_at,
    };
    let mut permissions = Vec::new();
    let mut channels = Vec::new();
    for v6 in [false, true] {
        let extra = u16::from(v6);
        let f = indication_family(v6, PERMISSION_ONLY);
        permissions.push(permission(
            &f,
            PERMISSION_ONLY + extra,
            f.peer.ip(),
            in_a_minute,
        ));
        let c = indication_family(v6, WITH_CHANNEL);
        permissions.push(permission(
            &c,
            WITH_CHANNEL + extra,
            c.peer.ip(),
            in_a_minute,
        ));
        channels.push(ChannelBinding {
            allocation: u64::from(WITH_CHANNEL + extra),
            client: c.client,
            listener: c.listener,
            relayed: c.relayed,
            peer: peer_port(&c, CHANNEL_PEER_PORT),
            channel: 0x4000 + WITH_CHANNEL + extra,
            expires_at: in_a_minute,
        });
        let e = indication_family(v6, EXPIRED);
        permissions.push(permission(&e, EXPIRED + extra, e.peer.ip(), past));
    }
    for (f, id) in [
        (XLAT_V4_SEND(), XLAT_V4_SEND_ID),
        (XLAT_V6_SEND(), XLAT_V6_SEND_ID),
        (DUAL_V4(), DUAL_ID),
        (DUAL_V6(), DUAL_ID),
    ] {
        permissions.push(permission(&f, id, f.peer.ip(), in_a_minute));
    }
    let f = indication_family(false, PERMISSION_ONLY);
    for peer in [DENIED_PEER, SMALL_MTU_PEER] {
        permissions.push(permission(
            &f,
            PERMISSION_ONLY,
            addr(peer).ip(),
            in_a_minute,
        ));
    }
    (permissions, channels)
}

fn bindings() -> Vec<ChannelBinding> {
    let in_a_minute = Instant::now() + Duration::from_secs(60);
    let v4 = V4();
    let v6 = V6();
    let translated = |allocation, f: Family, channel| ChannelBinding {
        allocation,
        client: f.client,
        listener: f.listener,
        relayed: f.relayed,
        peer: f.peer,
        channel,
        expires_at: in_a_minute,
    };
    vec![
        ChannelBinding {
            allocation: 1,
            client: v4.client,
            listener: v4.listener,
            relayed: v4.relayed,
            peer: v4.peer,
            channel: CHANNEL_V4,
            expires_at: in_a_minute,
        },
        ChannelBinding {
            allocation: 2,
            client: v6.client,
            listener: v6.listener,
            relayed: v6.relayed,
            peer: v6.peer,
            channel: CHANNEL_V6,
            expires_at: in_a_minute,
        },
        ChannelBinding {
            allocation: 3,
            client: addr("198.18.1.2:40003"),
            listener: v4.listener,
            relayed: addr("198.18.2.1:50003"),
            peer: v4.peer,
            channel: 0x4003,
            expires_at: Instant::now()
                .checked_sub(Duration::from_secs(1))
                .expect("the clock is past boot + 1 s"),
        },
        ChannelBinding {
            allocation: 4,
            client: addr("198.18.1.2:40004"),
            listener: v4.listener,
            relayed: addr("198.18.1.1:50004"),
            peer: addr("198.18.1.3:9000"),
            channel: 0x4004,
            expires_at: in_a_minute,
        },
        ChannelBinding {
            allocation: 9,
            client: addr("198.18.1.2:40009"),
            listener: v4.listener,
            relayed: addr("198.18.2.1:50009"),
            peer: addr(SMALL_MTU_PEER),
            channel: 0x4009,
            expires_at: in_a_minute,
        },
        ChannelBinding {
            allocation: 8,
            client: addr("198.18.1.2:40008"),
            listener: v4.listener,
            relayed: addr("198.18.2.1:50008"),
            peer: addr(DENIED_PEER),
            channel: 0x4008,
            expires_at: in_a_minute,
        },
        translated(20, XLAT_V4_CLIENT(), 0x4020),
        translated(21, XLAT_V6_CLIENT(), 0x4021),
    ]
}

/// Allocations 5 and 6 peer with each other's relayed address; 7's peer is a relayed address
/// of no allocation; 25 (an IPv6 client) and 26 (an IPv4 one) peer with each other's IPv4
/// relayed address. All are hairpin bindings.
fn hairpin_bindings() -> Vec<ChannelBinding> {
    let in_a_minute = Instant::now() + Duration::from_secs(60);
    let listener = V4().listener;
    let listener6 = V6().listener;
    [
        (5, "198.18.1.2:40005", 50005, 50006, 0x4005),
        (6, "198.18.1.2:40006", 50006, 50005, 0x4006),
        (7, "198.18.1.2:40007", 50007, 50099, 0x4007),
        // Between families: an IPv6 client and an IPv4 one, both relayed over IPv4.
        (25, "[2001:2:0:1::2]:40025", 50025, 50026, 0x4025),
        (26, "198.18.1.2:40026", 50026, 50025, 0x4026),
    ]
    .into_iter()
    .map(
        |(allocation, client, relayed, peer, channel)| ChannelBinding {
            allocation,
            client: addr(client),
            listener: if client.starts_with('[') {
                listener6
            } else {
                listener
            },
            relayed: addr(&format!("198.18.2.1:{relayed}")),
            peer: addr(&format!("198.18.2.1:{peer}")),
            channel,
            expires_at: in_a_minute,
        },
    )
    .collect()
}

/// Every address an installed entry lets the program send to or from.
fn fuzz_allowed() -> fuzz::Allowed {
    let mut allowed = fuzz::Allowed {
        destinations: Default::default(),
        destination_ips: Default::default(),
        sources: Default::default(),
    };
    let (permissions, channels) = permissions();
    for binding in bindings()
        .into_iter()
        .chain(hairpin_bindings())
        .chain(channels)
    {
        allowed.destinations.extend([binding.client, binding.peer]);
        allowed.sources.extend([binding.listener, binding.relayed]);
    }
    for permission in permissions {
        allowed.destinations.insert(permission.client);
        allowed.destination_ips.insert(permission.peer_ip);
        allowed
            .sources
            .extend([permission.listener, permission.relayed]);
    }
    allowed
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|row| {
            row.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The transaction id of a Data indication the kernel sent in `template`'s addressing (zeros
/// when the output is too short to hold one).
fn output_tid(template: &UdpFrame, frame: &[u8]) -> [u8; 12] {
    let ip_header = if template.dst.is_ipv4() { 20 } else { 40 };
    // Ethernet, IP and UDP headers, then the STUN type, length and cookie.
    let at = 14 + ip_header + 8 + 8;
    frame
        .get(at..at + 12)
        .and_then(|tid| tid.try_into().ok())
        .unwrap_or([0; 12])
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("interface name");
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(index, 0, "no interface {name}");
    index
}

/// Runs `input` through `program` and returns its output with the verdict reasons counted
/// meanwhile, and allocation counter slot `slot`'s counters from just before the run. The
/// verdict counters are global: a frame the lab's interfaces send on their own (IPv6 router
/// solicitations, MLD reports) may reach the attached program during the run and count a
/// reason of its own; when more than `want` was counted, the run is repeated once.
fn run_counted(
    fastpath: &mut FastPath,
    program: TestProgram,
    input: &[u8],
    ingress: u32,
    want: Reason,
    slot: Option<u32>,
) -> (
    relay::fastpath::TestRunOutput,
    Vec<Reason>,
    Option<relay_common::AllocationCounters>,
) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let before = fastpath.verdict_counters().expect("counters");
        let slot_before = slot.map(|slot| fastpath.counters(slot).expect("allocation counters"));
        let out = fastpath
            .test_run(program, input, ingress)
            .unwrap_or_else(|e| panic!("test run: {e}"));
        let after = fastpath.verdict_counters().expect("counters");
        let counted: Vec<Reason> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| a.1 != b.1)
            .map(|(_, a)| a.0)
            .collect();
        if counted.len() <= 1 || !counted.contains(&want) || attempt == 2 {
            return (out, counted, slot_before);
        }
    }
}

fn run_fixtures(program: TestProgram) {
    require_root();
    let lab = ThreeHosts::new();
    lab.add_static_neighbours();
    lab.relay.ip(&[
        "route",
        "add",
        "198.18.2.50/32",
        "dev",
        &lab.relay_peer_if,
        "mtu",
        "100",
    ]);
    lab.relay.ip(&[
        "neigh",
        "replace",
        "198.18.2.50",
        "lladdr",
        &mac_string(PEER_MAC),
        "dev",
        &lab.relay_peer_if,
        "nud",
        "permanent",
    ]);
    lab.relay.ip(&[
        "neigh",
        "replace",
        "198.18.2.66",
        "lladdr",
        &mac_string(PEER_MAC),
        "dev",
        &lab.relay_peer_if,
        "nud",
        "permanent",
    ]);
    lab.relay.ip(&[
        "neigh",
        "replace",
        "198.18.1.3",
        "lladdr",
        &mac_string(NEAR_PEER_MAC),
        "dev",
        &lab.relay_client_if,
        "nud",
        "permanent",
    ]);
    let client_side = lab.relay_client_if.clone();
    let peer_side = lab.relay_peer_if.clone();

    lab.relay.run_inside(move || {
        let mut fastpath = FastPath::load().unwrap_or_else(|e| panic!("load: {e}"));
        // Attaching registers both interfaces as egress devices; no test traffic flows.
        for dev in [&client_side, &peer_side] {
            fastpath
                .attach(dev, AttachMode::XdpNative)
                .unwrap_or_else(|e| panic!("attach {dev}: {e}"));
        }
        let mut policy = lab_policy();
        policy.deny(DENIED_PEER.parse::<SocketAddr>().expect("addr").ip().into());
        fastpath.set_peer_policy(&policy).expect("kernel policy");
        let mut installer = Installer::new(&fastpath);
        for binding in bindings() {
            installer.install(&mut fastpath, &binding, false);
        }
        for binding in hairpin_bindings() {
            installer.install(&mut fastpath, &binding, true);
        }
        let (permissions, channels) = permissions();
        for binding in &channels {
            installer.install(&mut fastpath, binding, false);
        }
        for permission in &permissions {
            installer.install_permission(&mut fastpath, permission);
        }
        let client_index = ifindex(&client_side);
        let peer_index = ifindex(&peer_side);
        let (pass, redirect, tx) = match program {
            TestProgram::Xdp => (XDP_PASS, XDP_REDIRECT, XDP_TX),
            // TC redirects with bpf_redirect even to the ingress device.
            TestProgram::Tc => (TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_REDIRECT),
        };

        let mut failures = Vec::new();
        let mut tids = Vec::new();
        let fixtures = fixtures();
        for fixture in &fixtures {
            let ingress = if fixture.from_peer_side {
                peer_index
            } else {
                client_index
            };
            let expected_reason = match &fixture.expect {
                Expect::Forward { reason, .. } | Expect::Pass(reason) => *reason,
                Expect::DataIndication { .. } => Reason::ForwardDataToClient,
            };
            let (out, counted, slot_before) = run_counted(
                &mut fastpath,
                program,
                &fixture.input,
                ingress,
                expected_reason,
                fixture.counts.map(|(slot, _)| slot),
            );
            let (action, frame, reason) = match &fixture.expect {
                Expect::Forward {
                    frame,
                    same_interface,
                    reason,
                } => (
                    if *same_interface { tx } else { redirect },
                    frame.clone(),
                    *reason,
                ),
                Expect::Pass(reason) => (pass, fixture.input.clone(), *reason),
                Expect::DataIndication {
                    template,
                    peer,
                    data,
                } => {
                    let tid = output_tid(template, &out.frame);
                    tids.push(tid);
                    let mut frame = template.clone();
                    frame.payload = data_indication(tid, *peer, data);
                    (redirect, frame.build(), Reason::ForwardDataToClient)
                }
            };
            if let (Some((slot, want)), Some(before)) = (fixture.counts, slot_before) {
                let after = fastpath.counters(slot).expect("allocation counters");
                let got = [
                    after.to_peer_packets - before.to_peer_packets,
                    after.to_peer_bytes - before.to_peer_bytes,
                    after.to_client_packets - before.to_client_packets,
                    after.to_client_bytes - before.to_client_bytes,
                ];
                if got != want {
                    failures.push(format!(
                        "{}: allocation {slot} counted {got:?} (to peer packets, bytes, to \
                         client packets, bytes), want {want:?}",
                        fixture.name
                    ));
                }
            }
            if out.action != action || out.frame != frame || counted != [reason] {
                failures.push(format!(
                    "{}: action {} (want {action}), counted {counted:?} (want [{reason:?}])\n\
                     got:\n{}\nwant:\n{}",
                    fixture.name,
                    out.action,
                    hex(&out.frame),
                    hex(&frame)
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} of {} fixtures failed:\n\n{}",
            failures.len(),
            fixtures.len(),
            failures.join("\n\n")
        );
        // The kernel's transaction ids are random: no two alike, none all zero.
        let distinct: std::collections::HashSet<_> = tids.iter().collect();
        assert_eq!(
            distinct.len(),
            tids.len(),
            "repeated transaction ids: {tids:x?}"
        );
        assert!(!tids.contains(&[0; 12]), "zero transaction id");

        // Per-allocation counters saw exactly the forwarded fixtures (application bytes only).
        let v4 = fastpath.counters(1).expect("counters of allocation 1");
        assert_eq!(
            (v4.to_peer_packets, v4.to_peer_bytes),
            (4, 12 + 9 + 11 + 11),
            "allocation 1 to peer: {v4:?}"
        );
        assert_eq!(
            (v4.to_client_packets, v4.to_client_bytes),
            (3, 9 + 4),
            "allocation 1 to client: {v4:?}"
        );
        let v6 = fastpath.counters(2).expect("counters of allocation 2");
        assert_eq!((v6.to_peer_packets, v6.to_client_packets), (3, 2), "{v6:?}");
        // A hairpinned datagram counts as sent by one allocation and received by the other.
        let a = fastpath.counters(5).expect("counters of 5");
        let b = fastpath.counters(6).expect("counters of 6");
        assert_eq!((a.to_peer_packets, a.to_peer_bytes), (2, 22), "{a:?}");
        assert_eq!((b.to_client_packets, b.to_client_bytes), (2, 22), "{b:?}");

        // A policy change reaches the very next packet, whatever verdict the program cached.
        let input = client_frame(&V4(), &channel_data(CHANNEL_V4, b"policy", 0)).build();
        let mut stricter = policy.clone();
        stricter.deny("198.18.2.2/32".parse().expect("CIDR"));
        for (policy, want) in [
            (&stricter, Reason::PassPolicyDenied),
            (&policy, Reason::ForwardToPeer),
            (&stricter, Reason::PassPolicyDenied),
        ] {
            fastpath.set_peer_policy(policy).expect("kernel policy");
            let (_, counted, _) =
                run_counted(&mut fastpath, program, &input, client_index, want, None);
            assert_eq!(counted, [want]);
        }
        fastpath.set_peer_policy(&policy).expect("kernel policy");

        // Random and mutated frames against everything installed (see `fuzz`).
        let seeds: Vec<fuzz::Seed> = fixtures
            .iter()
            .map(|fixture| fuzz::Seed {
                frame: fixture.input.clone(),
                from_peer_side: fixture.from_peer_side,
            })
            .collect();
        let (drop, forwards) = match program {
            TestProgram::Xdp => (XDP_DROP, [XDP_TX, XDP_REDIRECT]),
            TestProgram::Tc => (TC_ACT_SHOT, [TC_ACT_REDIRECT, TC_ACT_REDIRECT]),
        };
        fuzz::run(
            &mut fastpath,
            program,
            &seeds,
            (client_index, peer_index),
            &fuzz_allowed(),
            &fuzz::Actions {
                pass,
                drop,
                forwards,
            },
        );

        // An element recycled for another key while the program reads it (preallocated maps
        // reuse elements at once): the key tag no longer matches, nothing is forwarded with a
        // mix of two bindings. Simulated by filing the v6 binding's entries under the v4 keys.
        let (v4_binding, v6_binding) = {
            let all = bindings();
            (all[0], all[1])
        };
        assert!(v4_binding.client.is_ipv4() && v6_binding.client.is_ipv6());
        fastpath
            .file_entries_under_other_keys(&v6_binding, &v4_binding)
            .expect("misfile entries");
        for (input, from_peer_side) in [
            (
                client_frame(&V4(), &channel_data(CHANNEL_V4, b"recycled", 0)).build(),
                false,
            ),
            (peer_frame(&V4(), b"recycled").build(), true),
        ] {
            let ingress = if from_peer_side {
                peer_index
            } else {
                client_index
            };
            let (out, counted, _) = run_counted(
                &mut fastpath,
                program,
                &input,
                ingress,
                Reason::PassEntryChanged,
                None,
            );
            assert_eq!((out.action, &out.frame), (pass, &input), "recycled entry");
            assert_eq!(counted, [Reason::PassEntryChanged]);
        }
        installer.install(&mut fastpath, &v4_binding, false);

        // Removal: the same frames now go to the socket path; removing twice is fine.
        fastpath.remove_channel(&v4_binding).expect("remove");
        fastpath.remove_channel(&v4_binding).expect("remove again");
        let input = client_frame(&V4(), &channel_data(CHANNEL_V4, b"gone", 0)).build();
        let out = fastpath
            .test_run(program, &input, client_index)
            .expect("test run");
        assert_eq!((out.action, &out.frame), (pass, &input), "after removal");
        fastpath.reset_counters(1).expect("reset counters");
        assert_eq!(fastpath.counters(1).expect("counters").to_peer_packets, 0);

        // Removing a permission sends both directions to the socket path; removing the client
        // entry makes its Send indications a stranger's.
        let f = indication_family(false, PERMISSION_ONLY);
        let send = client_frame(&f, &send_indication(tid(50), f.peer, b"gone", &[])).build();
        let data = peer_frame(&f, b"gone").build();
        let run = |fastpath: &mut FastPath, input: &[u8], ingress, want| {
            let (out, counted, _) = run_counted(fastpath, program, input, ingress, want, None);
            assert_eq!((out.action, &out.frame[..]), (pass, input), "after removal");
            counted
        };
        let permission = &permissions[0];
        assert_eq!(permission.peer_ip, f.peer.ip());
        fastpath
            .remove_permission(permission)
            .expect("remove permission");
        fastpath
            .remove_permission(permission)
            .expect("remove permission again");
        assert_eq!(
            run(&mut fastpath, &send, client_index, Reason::PassNoPermission),
            [Reason::PassNoPermission]
        );
        assert_eq!(
            run(&mut fastpath, &data, peer_index, Reason::PassUdpNoMatch),
            [Reason::PassUdpNoMatch]
        );
        fastpath.remove_client(permission).expect("remove client");
        fastpath
            .remove_client(permission)
            .expect("remove client again");
        assert_eq!(
            run(&mut fastpath, &send, client_index, Reason::PassNoBinding),
            [Reason::PassNoBinding]
        );
    });
}

#[test]
fn xdp_fixtures() {
    run_fixtures(TestProgram::Xdp);
}

#[test]
fn tc_fixtures() {
    run_fixtures(TestProgram::Tc);
}

/// The verifier's budget is one million processed instructions per program; a program near it
/// breaks on the next kernel whose verifier explores a little more. Keep half of it free.
#[test]
fn programs_verify_with_half_the_budget_free() {
    require_root();
    let fastpath = FastPath::load().unwrap_or_else(|e| panic!("load: {e}"));
    for (name, processed) in fastpath.verified_instructions().expect("program info") {
        let processed = processed.expect("kernel 5.16+ reports verified instructions");
        eprintln!("{name}: {processed} instructions verified");
        assert!(
            processed < 500_000,
            "{name}: the verifier processed {processed} instructions (budget 1,000,000)"
        );
    }
}
