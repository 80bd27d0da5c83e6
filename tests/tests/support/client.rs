//! A minimal TURN client over one UDP socket, built on the relay's own codec: enough to drive
//! allocations, permissions and channels from a test and to send malformed input on purpose.

use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use relay::proto::{
    auth::LongTermKey,
    stun::{AddressFamily, Attribute, Class, Message, MessageBuilder, Method, TransactionId},
};

pub struct Client {
    pub socket: UdpSocket,
    pub server: SocketAddr,
    realm: String,
    auth: Option<(String, LongTermKey, String)>,
    next_tid: u8,
}

impl Client {
    /// A client on `socket` (bind it in the namespace the client lives in).
    pub fn with_socket(socket: UdpSocket, server: SocketAddr, realm: &str) -> Self {
        socket
            .set_read_timeout(Some(Duration::from_millis(700)))
            .expect("timeout");
        Self {
            socket,
            server,
            realm: realm.to_owned(),
            auth: None,
            next_tid: 0,
        }
    }

    /// A client on a fresh loopback socket.
    pub fn new(server: SocketAddr, realm: &str) -> Self {
        Self::with_socket(
            UdpSocket::bind("127.0.0.1:0").expect("client socket"),
            server,
            realm,
        )
    }

    pub fn send_raw(&self, bytes: &[u8]) {
        self.socket.send_to(bytes, self.server).expect("send");
    }

    /// The next datagram from the server, if one comes within the timeout.
    pub fn recv(&self) -> Option<Vec<u8>> {
        self.recv_from().map(|(datagram, _)| datagram)
    }

    /// The next datagram and the address it came from, if one comes within the timeout.
    pub fn recv_from(&self) -> Option<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; 65_536];
        match self.socket.recv_from(&mut buf) {
            Ok((n, from)) => Some((buf[..n].to_vec(), from)),
            Err(_) => None,
        }
    }

    /// Sends a request (signed once logged in) and returns the answer with its transaction id,
    /// skipping anything else that arrives meanwhile (ChannelData, Data indications).
    pub fn request(&mut self, method: Method, attrs: &[Attribute<'_>]) -> Vec<u8> {
        self.request_from(method, attrs).0
    }

    /// [`Client::request`], also returning the address the answer came from.
    pub fn request_from(
        &mut self,
        method: Method,
        attrs: &[Attribute<'_>],
    ) -> (Vec<u8>, SocketAddr) {
        self.next_tid = self.next_tid.wrapping_add(1);
        let tid = TransactionId([self.next_tid; 12]);
        let mut b = MessageBuilder::new(Class::Request, method, tid);
        for a in attrs {
            b.add(a);
        }
        let bytes = match &self.auth {
            Some((user, key, nonce)) => {
                b.add(&Attribute::Username(user))
                    .add(&Attribute::Realm(&self.realm))
                    .add(&Attribute::Nonce(nonce));
                b.finish(Some(key.as_bytes()), true)
            }
            None => b.finish(None, true),
        };
        self.send_raw(&bytes);
        for _ in 0..1000 {
            let (answer, from) = self.recv_from().expect("a response");
            if Message::decode(&answer).is_ok_and(|m| m.transaction_id() == tid) {
                return (answer, from);
            }
        }
        panic!("no response to {method:?}");
    }

    /// Takes REALM/NONCE from a 401 and signs from now on.
    pub fn login(&mut self, user: &str, password: &str) {
        let response = self.request(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
        let msg = Message::decode(&response).expect("valid response");
        assert_eq!(msg.error_code(), Some(401));
        let nonce = msg.nonce().expect("nonce").to_owned();
        let key = LongTermKey::derive(user, &self.realm, password);
        self.auth = Some((user.to_owned(), key, nonce));
    }

    /// Allocate (after `login`); returns the relayed address.
    pub fn allocate(&mut self) -> SocketAddr {
        self.allocate_with(&[Attribute::RequestedTransport(17)])
    }

    /// Allocate an IPv6 relayed address (RFC 8656 §7.1 REQUESTED-ADDRESS-FAMILY).
    pub fn allocate_ipv6(&mut self) -> SocketAddr {
        self.allocate_with(&[
            Attribute::RequestedTransport(17),
            Attribute::RequestedAddressFamily(AddressFamily::V6),
        ])
    }

    /// Allocate an IPv4 relayed address by name (RFC 8656 §7.1), e.g. from an IPv6 client.
    pub fn allocate_ipv4(&mut self) -> SocketAddr {
        self.allocate_with(&[
            Attribute::RequestedTransport(17),
            Attribute::RequestedAddressFamily(AddressFamily::V4),
        ])
    }

    /// A dual allocation (RFC 8656 §7.1 ADDITIONAL-ADDRESS-FAMILY): every relayed address the
    /// success carries, IPv4 first.
    pub fn allocate_dual(&mut self) -> Vec<SocketAddr> {
        let response = self.request(
            Method::ALLOCATE,
            &[
                Attribute::RequestedTransport(17),
                Attribute::AdditionalAddressFamily(AddressFamily::V6),
            ],
        );
        let msg = Message::decode(&response).expect("valid response");
        assert_eq!(msg.class(), Class::Success, "Allocate failed: {msg:?}");
        msg.attributes()
            .iter()
            .filter_map(|a| match a {
                Attribute::XorRelayedAddress(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    fn allocate_with(&mut self, attrs: &[Attribute<'_>]) -> SocketAddr {
        let response = self.request(Method::ALLOCATE, attrs);
        Message::decode(&response)
            .ok()
            .and_then(|m| m.xor_relayed_address())
            .unwrap_or_else(|| panic!("Allocate failed: {:?}", Message::decode(&response)))
    }

    /// The error code of a request's answer (`None` for a success).
    pub fn request_error(&mut self, method: Method, attrs: &[Attribute<'_>]) -> Option<u16> {
        let response = self.request(method, attrs);
        let msg = Message::decode(&response).expect("valid response");
        match msg.class() {
            Class::Success => None,
            _ => Some(msg.error_code().expect("error response carries a code")),
        }
    }

    /// Sends a Send indication (RFC 8656 §11.1) of `data` to `peer`; nothing is answered.
    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) {
        self.next_tid = self.next_tid.wrapping_add(1);
        let mut b = MessageBuilder::new(
            Class::Indication,
            Method::SEND,
            TransactionId([self.next_tid; 12]),
        );
        b.add(&Attribute::XorPeerAddress(peer))
            .add(&Attribute::Data(data));
        self.send_raw(&b.finish(None, true));
    }

    /// ChannelBind `channel` to `peer`; panics unless it succeeds.
    pub fn bind_channel(&mut self, channel: u16, peer: SocketAddr) {
        let response = self.request(
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(channel),
                Attribute::XorPeerAddress(peer),
            ],
        );
        let class = Message::decode(&response).map(|m| m.class());
        assert_eq!(
            class,
            Ok(Class::Success),
            "ChannelBind {channel:#x} -> {peer}"
        );
    }

    /// Refresh with LIFETIME 0: deletes the allocation.
    pub fn delete(&mut self) {
        let response = self.request(Method::REFRESH, &[Attribute::Lifetime(0)]);
        let class = Message::decode(&response).map(|m| m.class());
        assert_eq!(class, Ok(Class::Success), "Refresh(0)");
    }
}

/// Error code of an encoded STUN answer.
pub fn error_code(bytes: &[u8]) -> Option<u16> {
    Message::decode(bytes).ok().and_then(|m| m.error_code())
}
