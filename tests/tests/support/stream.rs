//! A minimal TURN client over one TCP or TLS connection (RFC 8656 §5), built on the relay's own
//! codec: framing by the STUN header length and by the padded ChannelData length (§12.5), enough
//! to allocate, relay, watch the connection being closed, and send malformed streams on purpose.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use relay::proto::{
    auth::LongTermKey,
    stun::{Attribute, Class, Message, MessageBuilder, Method, TransactionId},
};
use rustls::{pki_types::CertificateDer, ClientConfig, ClientConnection, StreamOwned};

/// How long one read waits before the caller sees a timeout.
const READ_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a request waits for its answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

pub enum Conn {
    Tcp(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Tcp(s) => s,
            Self::Tls(s) => &s.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Tls(s) => s.flush(),
        }
    }
}

/// Why no frame came.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    /// Nothing complete within the read timeout; the connection is still open.
    Timeout,
    /// The relay closed the connection (EOF, reset, TLS close or alert): what the reader saw.
    Closed(String),
}

/// A TCP connection from `local` (any port) to `server`, Nagle off so tiny writes leave at once.
pub fn tcp_connect(local: Option<IpAddr>, server: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = match local {
        Some(ip) => {
            let domain = socket2::Domain::for_address(server);
            let socket =
                socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
            socket.bind(&SocketAddr::new(ip, 0).into())?;
            socket.connect_timeout(&server.into(), Duration::from_secs(5))?;
            TcpStream::from(socket)
        }
        None => TcpStream::connect_timeout(&server, Duration::from_secs(5))?,
    };
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    Ok(stream)
}

/// Frame length of the stream message starting `buf` (header included, ChannelData padded to
/// 4), once its first 4 bytes are there.
pub fn frame_len(buf: &[u8]) -> Option<usize> {
    let head = buf.get(..4)?;
    let length = usize::from(u16::from_be_bytes([head[2], head[3]]));
    Some(if head[0] >> 6 == 0b01 {
        4 + length.div_ceil(4) * 4
    } else {
        20 + length
    })
}

pub struct StreamClient {
    pub conn: Conn,
    pub server: SocketAddr,
    buf: Vec<u8>,
    realm: String,
    auth: Option<(String, LongTermKey, String)>,
    next_tid: u32,
}

impl StreamClient {
    /// TURN over TCP to `server`.
    pub fn tcp(server: SocketAddr, realm: &str) -> Self {
        Self::tcp_from(None, server, realm)
    }

    /// TURN over TCP to `server` from source address `local`.
    pub fn tcp_from(local: Option<IpAddr>, server: SocketAddr, realm: &str) -> Self {
        let stream =
            tcp_connect(local, server).unwrap_or_else(|e| panic!("connect tcp {server}: {e}"));
        Self::with_conn(Conn::Tcp(stream), server, realm)
    }

    /// TURN over TLS to `server` (certificate checked against `config`'s roots for the
    /// server's IP address); the handshake is done before this returns.
    pub fn tls(server: SocketAddr, realm: &str, config: Arc<ClientConfig>) -> Self {
        Self::try_tls(server, realm, config)
            .unwrap_or_else(|e| panic!("TLS handshake with {server}: {e}"))
    }

    /// [`StreamClient::tls`], returning the handshake's error instead of panicking.
    pub fn try_tls(
        server: SocketAddr,
        realm: &str,
        config: Arc<ClientConfig>,
    ) -> Result<Self, String> {
        let mut stream = tcp_connect(None, server).map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut conn = ClientConnection::new(config, super::tls::server_name(server.ip()))
            .map_err(|e| e.to_string())?;
        while conn.is_handshaking() {
            conn.complete_io(&mut stream)
                .map_err(|e| format!("handshake: {e}"))?;
        }
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .map_err(|e| e.to_string())?;
        Ok(Self::with_conn(
            Conn::Tls(Box::new(StreamOwned::new(conn, stream))),
            server,
            realm,
        ))
    }

    pub fn with_conn(conn: Conn, server: SocketAddr, realm: &str) -> Self {
        Self {
            conn,
            server,
            buf: Vec::new(),
            realm: realm.to_owned(),
            auth: None,
            next_tid: 0,
        }
    }

    /// The certificate the relay presented (TLS only).
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        match &self.conn {
            Conn::Tls(s) => s
                .conn
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|c| c.clone().into_owned()),
            Conn::Tcp(_) => None,
        }
    }

    /// The negotiated TLS version (TLS only).
    pub fn tls_version(&self) -> Option<rustls::ProtocolVersion> {
        match &self.conn {
            Conn::Tls(s) => s.conn.protocol_version(),
            Conn::Tcp(_) => None,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.conn.tcp().local_addr().expect("local address")
    }

    /// Writes `bytes` as they are (a write error means the relay closed the connection).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.conn.write_all(bytes)?;
        self.conn.flush()
    }

    /// The next complete message (STUN or padded ChannelData) within the read timeout.
    pub fn next_frame(&mut self) -> Result<Vec<u8>, ReadEnd> {
        loop {
            if let Some(len) = frame_len(&self.buf) {
                if self.buf.len() >= len {
                    return Ok(self.buf.drain(..len).collect());
                }
            }
            let mut chunk = [0u8; 16_384];
            match self.conn.read(&mut chunk) {
                Ok(0) => return Err(ReadEnd::Closed("EOF".to_owned())),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(ReadEnd::Timeout)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadEnd::Closed(e.to_string())),
            }
        }
    }

    /// Waits up to `within` for the relay to close the connection, discarding whatever else
    /// arrives; what the reader saw at the close, and when.
    pub fn closed_within(&mut self, within: Duration) -> Option<(String, Duration)> {
        let start = Instant::now();
        while start.elapsed() < within {
            match self.next_frame() {
                Err(ReadEnd::Closed(how)) => return Some((how, start.elapsed())),
                Ok(_) | Err(ReadEnd::Timeout) => {}
            }
        }
        None
    }

    fn tid(&mut self) -> TransactionId {
        self.next_tid = self.next_tid.wrapping_add(1);
        let mut id = [0x5a; 12];
        id[8..].copy_from_slice(&self.next_tid.to_be_bytes());
        TransactionId(id)
    }

    /// Encodes a request (signed once logged in) with a fresh transaction id.
    pub fn encode_request(
        &mut self,
        method: Method,
        attrs: &[Attribute<'_>],
    ) -> (TransactionId, Vec<u8>) {
        let tid = self.tid();
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
        (tid, bytes)
    }

    /// The answer to `tid`, skipping anything else (ChannelData, Data indications).
    pub fn answer(&mut self, tid: TransactionId) -> Result<Vec<u8>, ReadEnd> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while Instant::now() < deadline {
            match self.next_frame() {
                Ok(frame) => {
                    if Message::decode(&frame).is_ok_and(|m| m.transaction_id() == tid) {
                        return Ok(frame);
                    }
                }
                Err(ReadEnd::Timeout) => {}
                Err(closed) => return Err(closed),
            }
        }
        Err(ReadEnd::Timeout)
    }

    /// Sends a request and returns its answer, or why none came.
    pub fn try_request(
        &mut self,
        method: Method,
        attrs: &[Attribute<'_>],
    ) -> Result<Vec<u8>, ReadEnd> {
        let (tid, bytes) = self.encode_request(method, attrs);
        self.send_raw(&bytes)
            .map_err(|e| ReadEnd::Closed(format!("write: {e}")))?;
        self.answer(tid)
    }

    /// Sends a request and returns its answer; panics if none comes.
    pub fn request(&mut self, method: Method, attrs: &[Attribute<'_>]) -> Vec<u8> {
        self.try_request(method, attrs)
            .unwrap_or_else(|end| panic!("no answer to {method:?} on {}: {end:?}", self.server))
    }

    /// A Binding request; the XOR-MAPPED-ADDRESS it returns.
    pub fn binding(&mut self) -> Result<SocketAddr, ReadEnd> {
        let answer = self.try_request(Method::BINDING, &[])?;
        let msg = Message::decode(&answer).expect("valid Binding answer");
        assert_eq!(msg.class(), Class::Success, "Binding: {msg:?}");
        Ok(msg.xor_mapped_address().expect("XOR-MAPPED-ADDRESS"))
    }

    /// Takes REALM/NONCE from a 401 and signs from now on.
    pub fn login(&mut self, user: &str, password: &str) {
        let response = self.request(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
        let msg = Message::decode(&response).expect("valid response");
        assert_eq!(msg.error_code(), Some(401), "{msg:?}");
        let nonce = msg.nonce().expect("nonce").to_owned();
        let key = LongTermKey::derive(user, &self.realm, password);
        self.auth = Some((user.to_owned(), key, nonce));
    }

    /// Allocate (after `login`); returns the relayed address.
    pub fn allocate(&mut self) -> SocketAddr {
        let response = self.request(Method::ALLOCATE, &[Attribute::RequestedTransport(17)]);
        Message::decode(&response)
            .ok()
            .and_then(|m| m.xor_relayed_address())
            .unwrap_or_else(|| panic!("Allocate failed: {:?}", Message::decode(&response)))
    }

    /// The class and error code of a request's answer.
    pub fn outcome(&mut self, method: Method, attrs: &[Attribute<'_>]) -> (Class, Option<u16>) {
        let response = self.request(method, attrs);
        let msg = Message::decode(&response).expect("valid response");
        (msg.class(), msg.error_code())
    }

    /// CreatePermission for `peer`; panics unless it succeeds.
    pub fn permit(&mut self, peer: SocketAddr) {
        let outcome = self.outcome(
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(peer)],
        );
        assert_eq!(outcome, (Class::Success, None), "CreatePermission {peer}");
    }

    /// ChannelBind `channel` to `peer`; panics unless it succeeds.
    pub fn bind_channel(&mut self, channel: u16, peer: SocketAddr) {
        let outcome = self.outcome(
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(channel),
                Attribute::XorPeerAddress(peer),
            ],
        );
        assert_eq!(outcome, (Class::Success, None), "ChannelBind {channel:#x}");
    }

    /// Refresh with `lifetime`; the class and error code of the answer.
    pub fn refresh(&mut self, lifetime: u32) -> (Class, Option<u16>) {
        self.outcome(Method::REFRESH, &[Attribute::Lifetime(lifetime)])
    }

    /// A Send indication of `data` to `peer`.
    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) -> std::io::Result<()> {
        let tid = self.tid();
        let mut b = MessageBuilder::new(Class::Indication, Method::SEND, tid);
        b.add(&Attribute::XorPeerAddress(peer))
            .add(&Attribute::Data(data));
        let bytes = b.finish(None, true);
        self.send_raw(&bytes)
    }

    /// ChannelData on `channel`, padded to a multiple of 4 (RFC 8656 §12.5).
    pub fn send_channel_data(&mut self, channel: u16, data: &[u8]) -> std::io::Result<()> {
        let bytes = channel_data(channel, data);
        self.send_raw(&bytes)
    }

    /// The payload of the next Data indication or ChannelData (with its channel number, or 0
    /// for a Data indication) within the answer timeout.
    pub fn next_data(&mut self) -> Result<(u16, Vec<u8>), ReadEnd> {
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        while Instant::now() < deadline {
            match self.next_frame() {
                Ok(frame) if frame[0] >> 6 == 0b01 => {
                    let channel = u16::from_be_bytes([frame[0], frame[1]]);
                    let len = usize::from(u16::from_be_bytes([frame[2], frame[3]]));
                    return Ok((channel, frame[4..4 + len].to_vec()));
                }
                Ok(frame) => {
                    let Ok(msg) = Message::decode(&frame) else {
                        continue;
                    };
                    if (msg.class(), msg.method()) == (Class::Indication, Method::DATA) {
                        let data = msg.attributes().iter().find_map(|a| match a {
                            Attribute::Data(d) => Some(d.to_vec()),
                            _ => None,
                        });
                        return Ok((0, data.expect("DATA attribute")));
                    }
                }
                Err(ReadEnd::Timeout) => {}
                Err(closed) => return Err(closed),
            }
        }
        Err(ReadEnd::Timeout)
    }
}

/// ChannelData on `channel` padded to a multiple of 4 for a stream (RFC 8656 §12.5).
pub fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(data.len()).expect("ChannelData under 64 KiB");
    let mut bytes = Vec::with_capacity(4 + data.len() + 3);
    bytes.extend_from_slice(&channel.to_be_bytes());
    bytes.extend_from_slice(&len.to_be_bytes());
    bytes.extend_from_slice(data);
    while bytes.len() % 4 != 0 {
        bytes.push(0);
    }
    bytes
}

/// A bare connection that waits for the relay to close it: reads until EOF or an error, up to
/// `within`; what ended it and when, or `None` while still open.
pub fn raw_closed_within(stream: &mut TcpStream, within: Duration) -> Option<(String, Duration)> {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < within {
        match stream.read(&mut buf) {
            Ok(0) => return Some(("EOF".to_owned(), start.elapsed())),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Some((e.to_string(), start.elapsed())),
        }
    }
    None
}

/// A relay on loopback with a UDP, a TCP and a TLS listener (the certificate from `pki`), user
/// `alice:wonderland`, realm `relay.local`, peers allowed on 127.0.0.2; both stream listeners
/// accept connections when this returns.
pub struct StreamRelay {
    pub relay: super::Relay,
    pub tcp: SocketAddr,
    pub tls: SocketAddr,
}

impl StreamRelay {
    pub fn start(pki: &super::tls::TestPki, extra: &[&str]) -> Self {
        let free = || -> SocketAddr {
            format!("127.0.0.1:{}", super::free_tcp_port("127.0.0.1"))
                .parse()
                .expect("addr")
        };
        let (tcp, tls) = (free(), free());
        let (tcp_arg, tls_arg) = (tcp.to_string(), tls.to_string());
        let (cert, key) = (pki.cert_path(), pki.key_path());
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--listen-tcp",
            &tcp_arg,
            "--listen-tls",
            &tls_arg,
            "--tls-cert",
            cert.to_str().expect("utf-8 path"),
            "--tls-key",
            key.to_str().expect("utf-8 path"),
            "--relay-ip",
            "127.0.0.1",
            "--realm",
            "relay.local",
            "--allow-peer-unsafe",
            "127.0.0.2",
            "--user",
            "alice:wonderland",
            "--log-level",
            "info",
        ];
        args.extend_from_slice(extra);
        let relay = super::Relay::start(&args);
        relay.wait_tcp_listening(tcp);
        relay.wait_tcp_listening(tls);
        Self { relay, tcp, tls }
    }
}
