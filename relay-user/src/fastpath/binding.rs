//! A channel binding as the daemon knows it, and its two kernel map entries.

use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use relay_common::{
    ip_field, ipv4_field, port_field, ChannelKey, ClientKey, PeerKey, Permission, PermissionKey,
    ToClient, ToPeer, ToRelay, CHANNEL_MAX, CHANNEL_MIN, FAMILY_IPV4, FAMILY_IPV6, FLAG_ENABLED,
    FLAG_HAIRPIN, FLAG_TRANSLATE,
};

use super::FastPathError;

/// One channel of one allocation (RFC 8656 §12): everything the kernel needs to forward
/// ChannelData both ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelBinding {
    /// Allocation id.
    pub allocation: u64,
    /// The client's transport address (as the listener sees it).
    pub client: SocketAddr,
    /// The listener address the client sends to.
    pub listener: SocketAddr,
    /// The allocation's relayed transport address.
    pub relayed: SocketAddr,
    /// The peer bound to the channel.
    pub peer: SocketAddr,
    /// Channel number, 0x4000..=0x7fff (0x4fff unless --legacy-channels).
    pub channel: u16,
    /// When the binding expires (RFC 8656 §12: 10 minutes after the last refresh, or the
    /// allocation's or permission's end if earlier). The kernel stops forwarding then.
    pub expires_at: Instant,
}

/// What a binding refers to besides its addresses: the next hops of its client and peer
/// addresses, whether its peer is another allocation of this relay (then the peer next hop is
/// unused: the kernel delivers to that allocation's client through that client's next hop),
/// and its allocation's counter slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindingHops {
    pub client: u16,
    pub peer: u16,
    pub hairpin: bool,
    pub counters: u32,
}

/// One permission of one allocation (RFC 8656 §9): what the kernel needs to forward Send
/// indications to the peer IP and the peer's datagrams (without a channel) as Data indications.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PermissionBinding {
    /// Allocation id.
    pub allocation: u64,
    pub client: SocketAddr,
    pub listener: SocketAddr,
    pub relayed: SocketAddr,
    pub peer_ip: IpAddr,
    /// When the permission (or its allocation) ends.
    pub expires_at: Instant,
}

impl PermissionBinding {
    /// Whether the kernel can carry it: one family on the client side (client, listener) and
    /// one on the peer side (relayed address, peer); between them the kernel translates.
    pub fn supported(&self) -> bool {
        family(self.client.ip()) == family(self.listener.ip())
            && family(self.relayed.ip()) == family(self.peer_ip)
    }

    /// The allocation's [`ClientKey`] and its [`ToRelay`] entry with this permission's relayed
    /// address (the one of the peer's family; a dual allocation's other one is merged in by
    /// the loader).
    pub(crate) fn client_entry(&self) -> (ClientKey, ToRelay) {
        let mut to_relay = ToRelay {
            flags: FLAG_ENABLED,
            ..ToRelay::default()
        };
        to_relay.set_relayed(
            family(self.relayed.ip()),
            field(self.relayed.ip()),
            port_field(self.relayed.port()),
        );
        let key = ClientKey {
            client_ip: field(self.client.ip()),
            listener_ip: field(self.listener.ip()),
            client_port: port_field(self.client.port()),
            listener_port: port_field(self.listener.port()),
            family: family(self.client.ip()),
            reserved: [0; 3],
        };
        (key, to_relay)
    }

    /// The permission's key.
    pub(crate) fn key(&self) -> PermissionKey {
        PermissionKey {
            relayed_ip: field(self.relayed.ip()),
            peer_ip: field(self.peer_ip),
            relayed_port: port_field(self.relayed.port()),
            family: family(self.relayed.ip()),
            reserved: 0,
        }
    }

    /// The permission's value, with expiry and digest left zero (the loader fills them).
    pub(crate) fn value(&self, hops: BindingHops) -> Permission {
        let flags = if family(self.client.ip()) == family(self.peer_ip) {
            FLAG_ENABLED
        } else {
            FLAG_ENABLED | FLAG_TRANSLATE
        };
        Permission {
            counters: hops.counters,
            flags,
            client_hop: hops.client,
            expires_at_ns: 0,
            listener_ip: field(self.listener.ip()),
            client_ip: field(self.client.ip()),
            listener_port: port_field(self.listener.port()),
            client_port: port_field(self.client.port()),
            peer_hop: hops.peer,
            ..Permission::default()
        }
    }
}

/// Whether the kernel can carry `binding` at all: a ChannelData channel number, one family on
/// the client side (client, listener) and one on the peer side (relayed address, peer).
pub fn supported(binding: &ChannelBinding) -> Result<(), FastPathError> {
    if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&binding.channel) {
        return Err(FastPathError::Unsupported(
            "channel number outside 0x4000..=0x7fff",
        ));
    }
    // The client side and the peer side each keep one family; between them the kernel
    // translates IPv4 ↔ IPv6 (RFC 8656 §7.2).
    let client_side = family(binding.client.ip()) == family(binding.listener.ip());
    let peer_side = family(binding.relayed.ip()) == family(binding.peer.ip());
    if !(client_side && peer_side) {
        return Err(FastPathError::Unsupported(
            "client and listener, relayed address and peer must each share a family",
        ));
    }
    Ok(())
}

/// The two map entries of `binding`, enabled, with expiry and digests left zero (the loader
/// fills them).
pub(crate) fn entries(
    binding: &ChannelBinding,
    hops: BindingHops,
) -> Result<(ChannelKey, ToPeer, PeerKey, ToClient), FastPathError> {
    supported(binding)?;
    let family = family(binding.client.ip());
    let peer_family = self::family(binding.peer.ip());
    let mut flags = FLAG_ENABLED;
    if hops.hairpin {
        flags |= FLAG_HAIRPIN;
    }
    if family != peer_family {
        flags |= FLAG_TRANSLATE;
    }
    let channel_key = ChannelKey {
        client_ip: field(binding.client.ip()),
        listener_ip: field(binding.listener.ip()),
        client_port: port_field(binding.client.port()),
        listener_port: port_field(binding.listener.port()),
        channel: port_field(binding.channel),
        family,
        reserved: 0,
    };
    let to_peer = ToPeer {
        counters: hops.counters,
        flags,
        next_hop: hops.peer,
        expires_at_ns: 0,
        relayed_ip: field(binding.relayed.ip()),
        peer_ip: field(binding.peer.ip()),
        relayed_port: port_field(binding.relayed.port()),
        peer_port: port_field(binding.peer.port()),
        digest: 0,
    };
    let peer_key = PeerKey {
        peer_ip: field(binding.peer.ip()),
        relayed_ip: field(binding.relayed.ip()),
        peer_port: port_field(binding.peer.port()),
        relayed_port: port_field(binding.relayed.port()),
        family: peer_family,
        reserved: [0; 3],
    };
    let to_client = ToClient {
        counters: hops.counters,
        flags,
        next_hop: hops.client,
        expires_at_ns: 0,
        listener_ip: field(binding.listener.ip()),
        client_ip: field(binding.client.ip()),
        listener_port: port_field(binding.listener.port()),
        client_port: port_field(binding.client.port()),
        channel: port_field(binding.channel),
        ..ToClient::default()
    };
    Ok((channel_key, to_peer, peer_key, to_client))
}

pub(crate) fn family(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => FAMILY_IPV4,
        IpAddr::V6(_) => FAMILY_IPV6,
    }
}

pub(crate) fn field(ip: IpAddr) -> [u32; 4] {
    match ip {
        IpAddr::V4(v4) => ipv4_field(v4.octets()),
        IpAddr::V6(v6) => ip_field(v6.octets()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(client: &str, peer: &str) -> ChannelBinding {
        let v6 = client.starts_with('[');
        ChannelBinding {
            allocation: 7,
            client: client.parse().unwrap(),
            listener: if v6 {
                "[2001:2:0:1::1]:3478"
            } else {
                "198.18.1.1:3478"
            }
            .parse()
            .unwrap(),
            relayed: if peer.starts_with('[') {
                "[2001:2:0:2::1]:50000"
            } else {
                "198.18.2.1:50000"
            }
            .parse()
            .unwrap(),
            peer: peer.parse().unwrap(),
            channel: 0x4001,
            expires_at: Instant::now(),
        }
    }

    #[test]
    fn keys_hold_packet_order_bytes() {
        let (key, to_peer, peer_key, to_client) = entries(
            &binding("198.18.1.2:40000", "198.18.2.2:9"),
            BindingHops::default(),
        )
        .unwrap();
        assert_eq!(key.client_ip[0].to_ne_bytes(), [198, 18, 1, 2]);
        assert_eq!(key.client_ip[1..], [0, 0, 0]);
        assert_eq!(key.client_port.to_ne_bytes(), 40000u16.to_be_bytes());
        assert_eq!(key.channel.to_ne_bytes(), [0x40, 0x01]);
        assert_eq!(key.family, FAMILY_IPV4);
        assert_eq!(to_peer.peer_port.to_ne_bytes(), [0, 9]);
        assert_eq!(peer_key.relayed_ip, to_peer.relayed_ip);
        assert_eq!(to_client.client_ip, key.client_ip);
        assert_eq!(to_client.counters, 0);
    }

    #[test]
    fn mixed_families_and_bad_channels_are_refused() {
        // An IPv4 client relaying to IPv6 (IPv6 relayed address): translated in the kernel.
        let (key, to_peer, peer_key, to_client) = entries(
            &binding("198.18.1.2:40000", "[2001:2:0:2::2]:9"),
            BindingHops::default(),
        )
        .unwrap();
        assert_eq!(key.family, FAMILY_IPV4);
        assert_eq!(peer_key.family, FAMILY_IPV6);
        assert_ne!(to_peer.flags & FLAG_TRANSLATE, 0);
        assert_ne!(to_client.flags & FLAG_TRANSLATE, 0);
        // A relayed address of one family and a peer of the other: never.
        let mut mixed = binding("198.18.1.2:40000", "198.18.2.2:9");
        mixed.peer = "[2001:2:0:2::2]:9".parse().unwrap();
        assert!(entries(&mixed, BindingHops::default()).is_err());
        let mut bad = binding("198.18.1.2:40000", "198.18.2.2:9");
        bad.channel = 0x8000;
        assert!(entries(&bad, BindingHops::default()).is_err());
        bad.channel = 0x3fff;
        assert!(entries(&bad, BindingHops::default()).is_err());
        // RFC 5766 numbers are accepted: the protocol core decides which ones are bound.
        bad.channel = 0x7fff;
        assert!(entries(&bad, BindingHops::default()).is_ok());
        assert!(entries(
            &binding("[2001:2:0:1::2]:40000", "[2001:2:0:2::2]:9"),
            BindingHops::default()
        )
        .is_ok());
    }
}
