//! Reusing the core's ChannelData decision across the datagrams of one GRO aggregate.
//!
//! UDP GRO hands a listener up to 64 datagrams of one flow (one client, one local address) as
//! one message. When they are ChannelData on one channel, the core decides the same for each
//! of them: [`relay_proto::server::Server::handle_client_datagram`] looks up the same route,
//! with the same `now`, and changes no state for ChannelData. Nothing else runs between the
//! datagrams of one message (no timer, request or other socket), so the worker asks the core
//! about the first one and reuses that answer for the others that carry the same channel,
//! checking only each one's own ChannelData framing. The profile of one flow showed the
//! per-datagram route lookup and peer policy check (hashing, a lock) as most of the worker's
//! user time.
//!
//! The memo lives for one received message: [`ChannelMemo::forget`] at each message's first
//! datagram, and any datagram it cannot answer goes to the core, whose decision (or refusal)
//! replaces it, so a STUN request inside an aggregate is handled in order as before.

use std::net::SocketAddr;

use relay_proto::{
    channel_data::{classify, ChannelData, PacketKind, CHANNEL_DATA_HEADER_LEN},
    server::Forward,
};

/// The last ChannelData decision of the current message.
#[derive(Debug, Default)]
pub struct ChannelMemo {
    last: Option<Decision>,
}

#[derive(Clone, Copy, Debug)]
struct Decision {
    client: SocketAddr,
    local: SocketAddr,
    channel: u16,
    relayed: SocketAddr,
    peer: SocketAddr,
}

impl ChannelMemo {
    /// A new message starts: what the core said about the previous one no longer applies.
    pub fn forget(&mut self) {
        self.last = None;
    }

    /// The core's decision for `data` from `client` to `local`, if it is ChannelData on the
    /// channel the core just routed for the same client and local address.
    pub fn lookup(&self, client: SocketAddr, local: SocketAddr, data: &[u8]) -> Option<Forward> {
        let last = self.last.as_ref()?;
        if last.client != client || last.local != local {
            return None;
        }
        let cd = channel_data(data)?;
        (cd.channel == last.channel).then(|| Forward::ToPeer {
            relayed: last.relayed,
            peer: last.peer,
            payload: CHANNEL_DATA_HEADER_LEN..CHANNEL_DATA_HEADER_LEN + cd.data.len(),
        })
    }

    /// Keeps the core's decision about `data` for the message's next datagrams (only a
    /// ChannelData datagram routed to a peer is kept; anything else clears the memo).
    pub fn remember(
        &mut self,
        client: SocketAddr,
        local: SocketAddr,
        data: &[u8],
        forward: Option<&Forward>,
    ) {
        self.last = match (forward, channel_data(data)) {
            (Some(Forward::ToPeer { relayed, peer, .. }), Some(cd)) => Some(Decision {
                client,
                local,
                channel: cd.channel,
                relayed: *relayed,
                peer: *peer,
            }),
            _ => None,
        };
    }
}

fn channel_data(data: &[u8]) -> Option<ChannelData<'_>> {
    match classify(data) {
        PacketKind::ChannelData => ChannelData::decode(data).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn cd(channel: u16, payload: &[u8]) -> Vec<u8> {
        let len = u16::try_from(payload.len()).expect("len");
        let mut out = ChannelData::header(channel, len).to_vec();
        out.extend_from_slice(payload);
        out
    }

    fn routed(relayed: SocketAddr, peer: SocketAddr, len: usize) -> Forward {
        Forward::ToPeer {
            relayed,
            peer,
            payload: CHANNEL_DATA_HEADER_LEN..CHANNEL_DATA_HEADER_LEN + len,
        }
    }

    #[test]
    fn reuses_the_decision_for_the_same_client_local_address_and_channel() {
        let (client, local) = (addr("198.18.1.2:5000"), addr("198.18.1.1:3478"));
        let (relayed, peer) = (addr("198.18.2.1:50000"), addr("198.18.2.2:7000"));
        let mut memo = ChannelMemo::default();
        let first = cd(0x4000, b"hello");
        assert_eq!(memo.lookup(client, local, &first), None, "empty memo");
        memo.remember(client, local, &first, Some(&routed(relayed, peer, 5)));
        // Same channel, other length: same route, the segment's own payload range.
        let second = cd(0x4000, b"hi!");
        assert_eq!(
            memo.lookup(client, local, &second),
            Some(routed(relayed, peer, 3))
        );
        // Another channel, client or local address, or not ChannelData: the core decides.
        assert_eq!(memo.lookup(client, local, &cd(0x4001, b"hi!")), None);
        assert_eq!(memo.lookup(addr("198.18.1.3:5000"), local, &second), None);
        assert_eq!(memo.lookup(client, addr("198.18.1.1:3479"), &second), None);
        assert_eq!(memo.lookup(client, local, &[0, 1, 0, 0]), None, "STUN");
        // Bad framing (length past the datagram) is never forwarded.
        assert_eq!(memo.lookup(client, local, &[0x40, 0, 0, 9, 1]), None);
        memo.forget();
        assert_eq!(memo.lookup(client, local, &second), None, "next message");
    }

    #[test]
    fn a_refusal_or_other_decision_clears_the_memo() {
        let (client, local) = (addr("[2001:db8::2]:5000"), addr("[2001:db8::1]:3478"));
        let (relayed, peer) = (addr("[2001:db8::1]:50000"), addr("[2001:db8::3]:7000"));
        let data = cd(0x4000, b"x");
        let mut memo = ChannelMemo::default();
        memo.remember(client, local, &data, Some(&routed(relayed, peer, 1)));
        memo.remember(client, local, &data, None);
        assert_eq!(memo.lookup(client, local, &data), None);
        memo.remember(client, local, &data, Some(&routed(relayed, peer, 1)));
        memo.remember(
            client,
            local,
            &[0, 1, 0, 0],
            Some(&routed(relayed, peer, 1)),
        );
        assert_eq!(memo.lookup(client, local, &data), None, "not ChannelData");
    }
}
