//! TURN requests and the Send indication decoded into typed values in one pass over their
//! attributes (RFC 8656 §7.2, §8, §10.2, §11.2, §12.2), so handlers read fields instead of
//! scanning attributes. Attribute rules that need no server state are checked here and turn into
//! the error code to answer with (RFC 8489 §14.8); rules that need the allocation or the
//! configuration's relay addresses stay with the handlers.

use std::net::SocketAddr;
use std::ops::RangeInclusive;

use crate::stun::{attr_type, AddressFamily, Attribute, Message, StunErrorCode};

/// IANA protocol number of UDP, the only REQUESTED-TRANSPORT supported (RFC 8656 §7.2).
const PROTOCOL_UDP: u8 = 17;

/// Why a request cannot be served as sent: the error response to give.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Rejection {
    /// ERROR-CODE of the response.
    pub code: StunErrorCode,
    /// Attribute types for UNKNOWN-ATTRIBUTES (with 420 only; empty otherwise).
    pub unknown: Vec<u16>,
}

impl Rejection {
    fn new(code: StunErrorCode) -> Self {
        Self {
            code,
            unknown: Vec::new(),
        }
    }
}

impl From<StunErrorCode> for Rejection {
    fn from(code: StunErrorCode) -> Self {
        Self::new(code)
    }
}

/// Allocate (RFC 8656 §7.2) after steps 3 to 6's attribute checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct AllocateRequest {
    /// REQUESTED-ADDRESS-FAMILY, IPv4 without one (step 6: whatever the client's own family).
    pub family: AddressFamily,
    /// ADDITIONAL-ADDRESS-FAMILY (IPv6): a dual allocation.
    pub dual: bool,
    /// EVEN-PORT (R=0): the relayed port must be even.
    pub even_port: bool,
    /// LIFETIME asked for, in seconds.
    pub lifetime: Option<u32>,
}

impl AllocateRequest {
    /// The first of each attribute counts, as everywhere in this server.
    pub fn decode(msg: &Message<'_>) -> Result<Self, Rejection> {
        let mut transport = None;
        let mut requested_family = None;
        let mut additional_family = None;
        let mut even_port = None;
        let mut token = false;
        let mut dont_fragment = false;
        let mut lifetime = None;
        for attribute in msg.attributes() {
            match attribute {
                Attribute::RequestedTransport(p) => transport = transport.or(Some(*p)),
                Attribute::RequestedAddressFamily(f) => {
                    requested_family = requested_family.or(Some(*f))
                }
                Attribute::AdditionalAddressFamily(f) => {
                    additional_family = additional_family.or(Some(*f))
                }
                Attribute::EvenPort(r) => even_port = even_port.or(Some(*r)),
                Attribute::ReservationToken(_) => token = true,
                Attribute::DontFragment => dont_fragment = true,
                Attribute::Lifetime(secs) => lifetime = lifetime.or(Some(*secs)),
                _ => {}
            }
        }
        // Step 3: REQUESTED-TRANSPORT, UDP only.
        match transport {
            None => return Err(StunErrorCode::BadRequest.into()),
            Some(PROTOCOL_UDP) => {}
            Some(_) => return Err(StunErrorCode::UnsupportedTransportProtocol.into()),
        }
        // Step 4: this server does not set DF on what it relays (neither the socket path nor
        // the kernel path), so DONT-FRAGMENT is treated as an unknown comprehension-required
        // attribute: 420 listing it, and the client may retry without it.
        if dont_fragment {
            return Err(Rejection {
                code: StunErrorCode::UnknownAttribute,
                unknown: vec![attr_type::DONT_FRAGMENT],
            });
        }
        // Steps 5 and 6: contradictory attribute combinations.
        if token
            && (requested_family.is_some() || additional_family.is_some() || even_port.is_some())
        {
            return Err(StunErrorCode::BadRequest.into());
        }
        if requested_family.is_some() && additional_family.is_some() {
            return Err(StunErrorCode::BadRequest.into());
        }
        if matches!(additional_family, Some(f) if f != AddressFamily::V6) {
            return Err(StunErrorCode::BadRequest.into());
        }
        // RESERVATION-TOKEN: this server never hands out reservations, so every token is
        // unknown → 508 as §7.2 prescribes for an invalid token. EVEN-PORT with R=1 would need
        // one too → 508.
        if token || even_port == Some(true) {
            return Err(StunErrorCode::InsufficientCapacity.into());
        }
        Ok(Self {
            family: requested_family.unwrap_or(AddressFamily::V4),
            dual: additional_family.is_some(),
            even_port: even_port.is_some(),
            lifetime,
        })
    }
}

/// Refresh (RFC 8656 §8).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct RefreshRequest {
    /// REQUESTED-ADDRESS-FAMILY: the family to refresh (the allocation must have it, 443).
    pub family: Option<AddressFamily>,
    /// LIFETIME asked for in seconds; 0 deletes the allocation.
    pub lifetime: Option<u32>,
}

impl RefreshRequest {
    /// Every Refresh decodes; its checks need the allocation.
    pub fn decode(msg: &Message<'_>) -> Self {
        let mut family = None;
        let mut lifetime = None;
        for attribute in msg.attributes() {
            match attribute {
                Attribute::RequestedAddressFamily(f) => family = family.or(Some(*f)),
                Attribute::Lifetime(secs) => lifetime = lifetime.or(Some(*secs)),
                _ => {}
            }
        }
        Self { family, lifetime }
    }
}

/// CreatePermission (RFC 8656 §10.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CreatePermissionRequest {
    /// Every XOR-PEER-ADDRESS, at least one.
    pub peers: Vec<SocketAddr>,
}

impl CreatePermissionRequest {
    /// RFC 8656 §10.2: at least one XOR-PEER-ADDRESS, else 400.
    pub fn decode(msg: &Message<'_>) -> Result<Self, Rejection> {
        let peers: Vec<SocketAddr> = msg.xor_peer_addresses().collect();
        if peers.is_empty() {
            return Err(StunErrorCode::BadRequest.into());
        }
        Ok(Self { peers })
    }
}

/// ChannelBind (RFC 8656 §12.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ChannelBindRequest {
    /// CHANNEL-NUMBER, inside the configured range.
    pub channel: u16,
    /// The one XOR-PEER-ADDRESS.
    pub peer: SocketAddr,
}

impl ChannelBindRequest {
    /// RFC 8656 §12.2: a CHANNEL-NUMBER in `channel_range` and exactly one XOR-PEER-ADDRESS,
    /// else 400.
    pub fn decode(
        msg: &Message<'_>,
        channel_range: &RangeInclusive<u16>,
    ) -> Result<Self, Rejection> {
        let mut channel = None;
        let mut peer = None;
        let mut peers = 0usize;
        for attribute in msg.attributes() {
            match attribute {
                Attribute::ChannelNumber(n) => channel = channel.or(Some(*n)),
                Attribute::XorPeerAddress(p) => {
                    peer = peer.or(Some(*p));
                    peers += 1;
                }
                _ => {}
            }
        }
        let Some(channel) = channel.filter(|n| channel_range.contains(n)) else {
            return Err(StunErrorCode::BadRequest.into());
        };
        match (peer, peers) {
            (Some(peer), 1) => Ok(Self { channel, peer }),
            _ => Err(StunErrorCode::BadRequest.into()),
        }
    }
}

/// Send indication (RFC 8656 §11.2): where to and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SendIndication<'a> {
    /// XOR-PEER-ADDRESS (the first one).
    pub peer: SocketAddr,
    /// DATA.
    pub data: &'a [u8],
}

impl<'a> SendIndication<'a> {
    /// None when the indication must be dropped: an unknown comprehension-required attribute
    /// (RFC 8489 §6.3.2), or no XOR-PEER-ADDRESS or DATA (RFC 8656 §11.2). Indications are never
    /// answered, so there is no error code.
    pub fn decode(msg: &Message<'a>) -> Option<Self> {
        if !msg.unknown_comprehension_required().is_empty() {
            return None;
        }
        let mut peer = None;
        let mut data = None;
        for attribute in msg.attributes() {
            match attribute {
                Attribute::XorPeerAddress(p) => peer = peer.or(Some(*p)),
                Attribute::Data(d) => data = data.or(Some(*d)),
                _ => {}
            }
        }
        Some(Self {
            peer: peer?,
            data: data?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stun::{Class, MessageBuilder, Method, TransactionId};

    fn encode(method: Method, class: Class, attrs: &[Attribute<'_>]) -> Vec<u8> {
        let mut b = MessageBuilder::new(class, method, TransactionId([7; 12]));
        for a in attrs {
            b.add(a);
        }
        b.finish(None, false)
    }

    fn allocate(attrs: &[Attribute<'_>]) -> Result<AllocateRequest, Rejection> {
        let bytes = encode(Method::ALLOCATE, Class::Request, attrs);
        AllocateRequest::decode(&Message::decode(&bytes).expect("valid message"))
    }

    #[test]
    fn allocate_attribute_rules_map_to_their_codes() {
        let udp = Attribute::RequestedTransport(PROTOCOL_UDP);
        assert_eq!(
            allocate(&[
                udp.clone(),
                Attribute::Lifetime(60),
                Attribute::EvenPort(false)
            ]),
            Ok(AllocateRequest {
                family: AddressFamily::V4,
                dual: false,
                even_port: true,
                lifetime: Some(60),
            })
        );
        assert_eq!(allocate(&[]), Err(StunErrorCode::BadRequest.into()));
        assert_eq!(
            allocate(&[Attribute::RequestedTransport(6)]),
            Err(StunErrorCode::UnsupportedTransportProtocol.into())
        );
        assert_eq!(
            allocate(&[udp.clone(), Attribute::DontFragment]),
            Err(Rejection {
                code: StunErrorCode::UnknownAttribute,
                unknown: vec![attr_type::DONT_FRAGMENT],
            })
        );
        let both_families = [
            udp.clone(),
            Attribute::RequestedAddressFamily(AddressFamily::V6),
            Attribute::AdditionalAddressFamily(AddressFamily::V6),
        ];
        assert_eq!(
            allocate(&both_families),
            Err(StunErrorCode::BadRequest.into())
        );
        assert_eq!(
            allocate(&[udp.clone(), Attribute::EvenPort(true)]),
            Err(StunErrorCode::InsufficientCapacity.into())
        );
        assert_eq!(
            allocate(&[udp, Attribute::ReservationToken([1; 8])]),
            Err(StunErrorCode::InsufficientCapacity.into())
        );
    }

    #[test]
    fn first_attribute_of_a_kind_counts() {
        let bytes = encode(
            Method::REFRESH,
            Class::Request,
            &[Attribute::Lifetime(0), Attribute::Lifetime(600)],
        );
        let refresh = RefreshRequest::decode(&Message::decode(&bytes).expect("valid"));
        assert_eq!(refresh.lifetime, Some(0));
    }

    #[test]
    fn channel_bind_needs_one_peer_and_a_number_in_range() {
        let peer: SocketAddr = "203.0.113.5:4000".parse().expect("addr");
        let other: SocketAddr = "203.0.113.6:4000".parse().expect("addr");
        let range = 0x4000..=0x4FFF;
        let bind = |attrs: &[Attribute<'_>]| {
            let bytes = encode(Method::CHANNEL_BIND, Class::Request, attrs);
            ChannelBindRequest::decode(&Message::decode(&bytes).expect("valid"), &range)
        };
        assert_eq!(
            bind(&[
                Attribute::ChannelNumber(0x4001),
                Attribute::XorPeerAddress(peer)
            ]),
            Ok(ChannelBindRequest {
                channel: 0x4001,
                peer
            })
        );
        let bad = Err(StunErrorCode::BadRequest.into());
        assert_eq!(bind(&[Attribute::XorPeerAddress(peer)]), bad);
        assert_eq!(
            bind(&[
                Attribute::ChannelNumber(0x5000),
                Attribute::XorPeerAddress(peer)
            ]),
            bad
        );
        assert_eq!(bind(&[Attribute::ChannelNumber(0x4001)]), bad);
        let two = [
            Attribute::ChannelNumber(0x4001),
            Attribute::XorPeerAddress(peer),
            Attribute::XorPeerAddress(other),
        ];
        assert_eq!(bind(&two), bad);
    }

    #[test]
    fn send_indication_needs_peer_and_data() {
        let peer: SocketAddr = "203.0.113.5:4000".parse().expect("addr");
        let bytes = encode(
            Method::SEND,
            Class::Indication,
            &[Attribute::XorPeerAddress(peer), Attribute::Data(b"hi")],
        );
        let msg = Message::decode(&bytes).expect("valid");
        assert_eq!(
            SendIndication::decode(&msg),
            Some(SendIndication { peer, data: b"hi" })
        );
        let bytes = encode(Method::SEND, Class::Indication, &[Attribute::Data(b"hi")]);
        let msg = Message::decode(&bytes).expect("valid");
        assert_eq!(SendIndication::decode(&msg), None);
    }
}
