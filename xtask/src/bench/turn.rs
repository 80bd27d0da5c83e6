//! The benchmark's TURN client: Allocate with long-term credentials (RFC 8656 §7), then
//! ChannelBind (§12) or, for the Send-indication variants, CreatePermission (§9), over a plain
//! UDP socket or (through [`Transport`], `stream`'s) a TCP or TLS connection; and the framing
//! of the Send indications (§10) the generator sends.
//!
//! Deliberately independent of relay-user's codec: xtask must build on a fresh machine before
//! `cargo xtask setup` installed the eBPF toolchain (relay-user's build script needs it), and a
//! second implementation catches encoder/decoder bugs that a shared codec would hide on both
//! ends. The same client drives coturn, which checks it against a third implementation.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context};
use base64::Engine;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};

const MAGIC: u32 = 0x2112_A442;
const ALLOCATE: u16 = 0x0003;
const CREATE_PERMISSION: u16 = 0x0008;
const CHANNEL_BIND: u16 = 0x0009;
const SEND_INDICATION: u16 = 0x0016;
const SUCCESS: u16 = 0x0100;
const ERROR: u16 = 0x0110;

const ATTR_USERNAME: u16 = 0x0006;
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_CHANNEL_NUMBER: u16 = 0x000C;
const ATTR_LIFETIME: u16 = 0x000D;
const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
const ATTR_DATA: u16 = 0x0013;
const ATTR_REALM: u16 = 0x0014;
const ATTR_NONCE: u16 = 0x0015;
const ATTR_XOR_RELAYED_ADDRESS: u16 = 0x0016;
const ATTR_REQUESTED_TRANSPORT: u16 = 0x0019;

/// First channel number the benchmark binds (RFC 8656 §12: 0x4000-0x4FFF).
pub const FIRST_CHANNEL: u16 = 0x4000;

/// TURN REST API credentials (draft-uberti-behave-turn-rest): both `relay --auth-secret` and
/// coturn's `use-auth-secret` accept them, and every username is distinct, so per-user
/// allocation caps never limit the 1000-allocation variant.
pub fn rest_credentials(secret: &str, name: &str) -> (String, String) {
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 24 * 3600;
    let username = format!("{expiry}:{name}");
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (username, password)
}

/// One allocation with one channel bound to one peer, or (`channel` None) only a permission
/// for it, so the client reaches the peer with Send indications.
pub struct Allocation {
    pub socket: Arc<UdpSocket>,
    pub relayed: SocketAddr,
    pub channel: Option<u16>,
}

/// How the client's requests reach the server: one request out, its response back.
pub trait Transport {
    /// Sends `message` (a request with transaction id `tid`) and returns the response to
    /// (`method`, `tid`), skipping anything else that arrives.
    fn exchange(&mut self, message: &[u8], method: u16, tid: &[u8; 12])
        -> anyhow::Result<Response>;
}

/// Requests over a UDP socket to `server`, retransmitted (RFC 8489 §6.2.1, shortened for a lab
/// link).
pub struct UdpTransport {
    pub socket: UdpSocket,
    pub server: SocketAddr,
}

impl Transport for UdpTransport {
    fn exchange(
        &mut self,
        message: &[u8],
        method: u16,
        tid: &[u8; 12],
    ) -> anyhow::Result<Response> {
        let mut buf = [0u8; 2048];
        let mut timeout = Duration::from_millis(200);
        for _ in 0..5 {
            self.socket.send_to(message, self.server)?;
            let deadline = Instant::now() + timeout;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                self.socket
                    .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                let n = match self.socket.recv_from(&mut buf) {
                    Ok((n, from)) if from == self.server => n,
                    Ok(_) => continue,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        break
                    }
                    Err(e) => return Err(e.into()),
                };
                if let Some(response) = decode(&buf[..n], method, tid) {
                    return Ok(response);
                }
            }
            timeout *= 2;
        }
        bail!(
            "no response to method {method:#06x} from {} within ~6 s",
            self.server
        )
    }
}

/// A TURN client session over `transport` (UDP here; TCP and TLS in `stream`).
pub struct Client<T = UdpTransport> {
    transport: T,
    username: String,
    password: String,
    key: [u8; 16],
    realm: String,
    nonce: String,
    next_tid: u64,
}

impl Client<UdpTransport> {
    pub fn new(socket: UdpSocket, server: SocketAddr, username: String, password: &str) -> Self {
        let seed = socket
            .local_addr()
            .map(|a| u64::from(a.port()))
            .unwrap_or(0);
        Self::over(UdpTransport { socket, server }, seed, username, password)
    }

    /// Allocate (answering the 401 challenge), then bind `channel` to `peer`.
    pub fn allocate_and_bind(
        mut self,
        peer: SocketAddr,
        channel: u16,
    ) -> anyhow::Result<Allocation> {
        let relayed = self.allocate()?;
        self.bind_channel(peer, channel)?;
        Ok(Allocation {
            socket: Arc::new(self.transport.socket),
            relayed,
            channel: Some(channel),
        })
    }

    /// Allocate, then install a permission for `peer`'s address and no channel: the client
    /// talks to the peer with Send indications and hears it through Data indications.
    pub fn allocate_and_permit(mut self, peer: SocketAddr) -> anyhow::Result<Allocation> {
        let relayed = self.allocate()?;
        let peer_value = encode_xor_v4(peer)?;
        self.authenticated(CREATE_PERMISSION, &[(ATTR_XOR_PEER_ADDRESS, &peer_value)])?;
        Ok(Allocation {
            socket: Arc::new(self.transport.socket),
            relayed,
            channel: None,
        })
    }
}

impl<T: Transport> Client<T> {
    /// A session over `transport`; `seed` makes its transaction ids differ from other
    /// sessions' (a local port, a connection number).
    pub fn over(transport: T, seed: u64, username: String, password: &str) -> Self {
        Self {
            transport,
            username,
            password: password.to_owned(),
            key: [0; 16],
            realm: String::new(),
            nonce: String::new(),
            next_tid: seed << 32 | u64::from(std::process::id()),
        }
    }

    /// The transport, for the data the session sends after its setup.
    pub fn into_transport(self) -> T {
        self.transport
    }

    /// Binds `channel` to `peer` (RFC 8656 §12.1) on an allocation made by `allocate`.
    pub fn bind_channel(&mut self, peer: SocketAddr, channel: u16) -> anyhow::Result<()> {
        let number = [(channel >> 8) as u8, channel as u8, 0, 0];
        let peer_value = encode_xor_v4(peer)?;
        self.authenticated(
            CHANNEL_BIND,
            &[
                (ATTR_CHANNEL_NUMBER, &number),
                (ATTR_XOR_PEER_ADDRESS, &peer_value),
            ],
        )?;
        Ok(())
    }

    /// Allocate (answering the 401 challenge); returns the relayed address.
    pub fn allocate(&mut self) -> anyhow::Result<SocketAddr> {
        let transport = [17u8, 0, 0, 0];
        let lifetime = 3600u32.to_be_bytes();
        // First request without credentials: the server answers 401 with REALM and NONCE.
        let first = self.request(ALLOCATE, &[(ATTR_REQUESTED_TRANSPORT, &transport)], false)?;
        let Response::Error(401, attrs) = first else {
            bail!("Allocate without credentials: expected 401, got {first:?}");
        };
        self.realm = attr_string(&attrs, ATTR_REALM).context("401 without REALM")?;
        self.nonce = attr_string(&attrs, ATTR_NONCE).context("401 without NONCE")?;
        self.key = Md5::digest(format!(
            "{}:{}:{}",
            self.username, self.realm, self.password
        ))
        .into();

        let attrs = self.authenticated(
            ALLOCATE,
            &[
                (ATTR_REQUESTED_TRANSPORT, &transport),
                (ATTR_LIFETIME, &lifetime),
            ],
        )?;
        attrs
            .iter()
            .find(|(t, _)| *t == ATTR_XOR_RELAYED_ADDRESS)
            .and_then(|(_, v)| decode_xor_v4(v))
            .context("Allocate success without XOR-RELAYED-ADDRESS")
    }

    /// An authenticated request; a 438 (stale nonce) is retried once with the new nonce.
    fn authenticated(
        &mut self,
        method: u16,
        attrs: &[(u16, &[u8])],
    ) -> anyhow::Result<Vec<(u16, Vec<u8>)>> {
        for _ in 0..2 {
            match self.request(method, attrs, true)? {
                Response::Success(attrs) => return Ok(attrs),
                Response::Error(438, attrs) => {
                    self.nonce = attr_string(&attrs, ATTR_NONCE).context("438 without NONCE")?;
                }
                Response::Error(code, attrs) => bail!(
                    "method {method:#06x}: error {code} {}",
                    attr_string(&attrs, ATTR_ERROR_CODE).unwrap_or_default()
                ),
            }
        }
        bail!("method {method:#06x}: nonce stale twice")
    }

    /// Sends one request and waits for its response.
    fn request(
        &mut self,
        method: u16,
        attrs: &[(u16, &[u8])],
        sign: bool,
    ) -> anyhow::Result<Response> {
        self.next_tid = self.next_tid.wrapping_add(1);
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&self.next_tid.to_be_bytes());
        tid[8..].copy_from_slice(&std::process::id().to_be_bytes());
        let mut all: Vec<(u16, Vec<u8>)> = attrs.iter().map(|(t, v)| (*t, v.to_vec())).collect();
        if sign {
            all.push((ATTR_USERNAME, self.username.clone().into_bytes()));
            all.push((ATTR_REALM, self.realm.clone().into_bytes()));
            all.push((ATTR_NONCE, self.nonce.clone().into_bytes()));
        }
        let message = encode(method, &tid, &all, sign.then_some(&self.key));
        self.transport.exchange(&message, method, &tid)
    }
}

/// The bytes of a Send indication (RFC 8656 §10.1) before its data: STUN header (with
/// transaction id `tid`), XOR-PEER-ADDRESS of `peer`, then DATA's header for `data_len` bytes.
/// No FINGERPRINT: the benchmark measures forwarding, not the relay's CRC-32 check (which the
/// kernel path runs whenever one is present). `data_len` must be a multiple of 4, so the data
/// ends the message without padding and the generator can append it as it is.
pub fn send_indication_header(
    tid: [u8; 12],
    peer: SocketAddr,
    data_len: usize,
) -> anyhow::Result<Vec<u8>> {
    if !data_len.is_multiple_of(4) || data_len > usize::from(u16::MAX) - 16 {
        bail!("Send indications carry data of a multiple of 4 bytes here, not {data_len}");
    }
    let peer_value = encode_xor_v4(peer)?;
    // XOR-PEER-ADDRESS (4 + 8) and DATA (4 + data_len) follow the header.
    let body_len = (4 + peer_value.len() + 4 + data_len) as u16;
    let mut out = Vec::with_capacity(36);
    out.extend_from_slice(&SEND_INDICATION.to_be_bytes());
    out.extend_from_slice(&body_len.to_be_bytes());
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&tid);
    out.extend_from_slice(&ATTR_XOR_PEER_ADDRESS.to_be_bytes());
    out.extend_from_slice(&(peer_value.len() as u16).to_be_bytes());
    out.extend_from_slice(&peer_value);
    out.extend_from_slice(&ATTR_DATA.to_be_bytes());
    out.extend_from_slice(&(data_len as u16).to_be_bytes());
    Ok(out)
}

/// STUN Binding (RFC 8489 §3).
pub const BINDING: u16 = 0x0001;

/// An unauthenticated Binding request with transaction id `tid`.
pub fn binding_request(tid: &[u8; 12]) -> Vec<u8> {
    encode(BINDING, tid, &[], None)
}

/// Whether a STUN server answers a Binding request (RFC 8489 §3) on `server` within `wait`.
pub fn binding_ping(socket: &UdpSocket, server: SocketAddr, wait: Duration) -> bool {
    let tid = [0x42u8; 12];
    let message = binding_request(&tid);
    let mut buf = [0u8; 1024];
    let _ = socket.set_read_timeout(Some(wait));
    if socket.send_to(&message, server).is_err() {
        return false;
    }
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if from == server => {
                if decode(&buf[..n], BINDING, &tid).is_some() {
                    return true;
                }
            }
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

#[derive(Debug)]
pub enum Response {
    Success(Vec<(u16, Vec<u8>)>),
    Error(u16, Vec<(u16, Vec<u8>)>),
}

fn attr_string(attrs: &[(u16, Vec<u8>)], typ: u16) -> Option<String> {
    attrs.iter().find(|(t, _)| *t == typ).map(|(_, v)| {
        let v = if typ == ATTR_ERROR_CODE && v.len() >= 4 {
            &v[4..]
        } else {
            &v[..]
        };
        String::from_utf8_lossy(v).into_owned()
    })
}

/// A request with `attrs`, signed with MESSAGE-INTEGRITY (RFC 8489 §14.5) when `key` is given.
fn encode(
    method: u16,
    tid: &[u8; 12],
    attrs: &[(u16, Vec<u8>)],
    key: Option<&[u8; 16]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&method.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(tid);
    for (typ, value) in attrs {
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    if let Some(key) = key {
        // The length field covers MESSAGE-INTEGRITY itself when the HMAC is computed.
        let len = (out.len() - 20 + 24) as u16;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(key).expect("any key length");
        mac.update(&out);
        out.extend_from_slice(&ATTR_MESSAGE_INTEGRITY.to_be_bytes());
        out.extend_from_slice(&20u16.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
    } else {
        let len = (out.len() - 20) as u16;
        out[2..4].copy_from_slice(&len.to_be_bytes());
    }
    out
}

/// The response to (`method`, `tid`), or None for anything else.
pub fn decode(buf: &[u8], method: u16, tid: &[u8; 12]) -> Option<Response> {
    if buf.len() < 20 || buf[4..8] != MAGIC.to_be_bytes() || &buf[8..20] != tid {
        return None;
    }
    let typ = u16::from_be_bytes([buf[0], buf[1]]);
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    let body = buf.get(20..20 + len)?;
    let mut attrs = Vec::new();
    let mut rest = body;
    while rest.len() >= 4 {
        let t = u16::from_be_bytes([rest[0], rest[1]]);
        let l = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let value = rest.get(4..4 + l)?;
        attrs.push((t, value.to_vec()));
        rest = rest.get((4 + l).next_multiple_of(4)..).unwrap_or(&[]);
    }
    if typ == method | SUCCESS {
        Some(Response::Success(attrs))
    } else if typ == method | ERROR {
        let code = attrs
            .iter()
            .find(|(t, _)| *t == ATTR_ERROR_CODE)
            .filter(|(_, v)| v.len() >= 4)
            .map(|(_, v)| u16::from(v[2] & 7) * 100 + u16::from(v[3]))
            .unwrap_or(0);
        Some(Response::Error(code, attrs))
    } else {
        None
    }
}

fn encode_xor_v4(addr: SocketAddr) -> anyhow::Result<Vec<u8>> {
    let SocketAddr::V4(v4) = addr else {
        bail!("the lab is IPv4 only");
    };
    let port = v4.port() ^ (MAGIC >> 16) as u16;
    let ip = u32::from(*v4.ip()) ^ MAGIC;
    let mut out = vec![0, 1];
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&ip.to_be_bytes());
    Ok(out)
}

fn decode_xor_v4(v: &[u8]) -> Option<SocketAddr> {
    if v.len() < 8 || v[1] != 1 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC >> 16) as u16;
    let ip = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC;
    Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_address_round_trips() {
        let addr: SocketAddr = "198.18.2.2:9000".parse().unwrap();
        assert_eq!(decode_xor_v4(&encode_xor_v4(addr).unwrap()), Some(addr));
    }

    #[test]
    fn send_indication_frames_the_data() {
        let peer: SocketAddr = "198.18.2.2:9000".parse().unwrap();
        let h = send_indication_header([9; 12], peer, 120).unwrap();
        assert_eq!(h.len(), 36);
        assert_eq!(&h[..4], &[0x00, 0x16, 0, 12 + 4 + 120]);
        assert_eq!(&h[4..8], &MAGIC.to_be_bytes());
        assert_eq!(&h[8..20], &[9; 12]);
        assert_eq!(&h[20..24], &[0x00, 0x12, 0, 8]);
        assert_eq!(decode_xor_v4(&h[24..32]), Some(peer));
        assert_eq!(&h[32..36], &[0x00, 0x13, 0, 120]);
        assert!(send_indication_header([0; 12], peer, 121).is_err());
    }

    #[test]
    fn signed_request_length_covers_integrity() {
        let msg = encode(
            ALLOCATE,
            &[7; 12],
            &[(ATTR_USERNAME, b"abc".to_vec())],
            Some(&[1; 16]),
        );
        assert_eq!(msg.len(), 20 + 8 + 24);
        assert_eq!(u16::from_be_bytes([msg[2], msg[3]]), 32);
    }
}
